"""The daemon against a real one-node Slurm (.ci/slurm_up.sh): its own dask-jobqueue cluster
grows with the queue, survives a worker's job being cancelled, and leaves no job behind.

The workers are Slurm jobs on this machine running the cluster block's ``python`` with its
``env`` (this tree on PYTHONPATH, the fake model family preloaded: tests/fake_worker.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import DaemonProcess, fake_weights, finished, progress_state, read_json, save_image, wait_for, write_config, write_sidecar
from test_service import SMALL

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment with SLURM_CONF for a running local Slurm; started here when not up yet."""
    pytest.importorskip("dask_jobqueue")
    started = subprocess.run([str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.skip(f"no local Slurm: {started.stderr.strip() or started.stdout.strip()}")
    conf = started.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = {**os.environ, "SLURM_CONF": conf}
    yield env
    subprocess.run(["scancel", "--full", "--name=dask-worker"], env=env, check=False)


def slurm_jobs(env: dict[str, str]) -> list[tuple[str, str]]:
    """(job id, state) of the dask worker jobs in the queue."""
    listed = subprocess.run(["squeue", "-h", "-n", "dask-worker", "-o", "%i %T"], env=env, capture_output=True,
                            text=True, check=True).stdout
    return [tuple(line.split()) for line in listed.splitlines() if line.strip()]


def workers(outbox: Path) -> list[dict]:
    return (read_json(outbox / "_samwatch" / "status.json") or {}).get("workers") or []


def drop(inbox: Path, stem: str, seconds: float) -> None:
    save_image(inbox / f"{stem}.png", SMALL)
    write_sidecar(inbox / f"{stem}.yaml", {"label": f"slow:{seconds}", "prompts": [{"bbox": [1, 1, 9, 9]}]})


@pytest.mark.slurm
@pytest.mark.subprocess
def test_adapt_grows_to_two_workers_survives_scancel_and_stops_clean(tmp_path: Path, slurm: dict[str, str]) -> None:
    assert not slurm_jobs(slurm), "dask worker jobs from elsewhere are in the queue"
    cluster = {
        "kind": "slurm", "queue": "ci", "cores": 1, "memory": "2GB", "walltime": "00:20:00",
        "adapt_minimum": 0, "adapt_maximum": 2, "python": sys.executable,
        "env": {"PYTHONPATH": f"{ROOT}:{TESTS}", "OMP_NUM_THREADS": "1",
                "DASK_DISTRIBUTED__WORKER__PRELOAD": "['fake_worker']"},
    }
    config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "cluster": cluster})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stems = [f"s{index}" for index in range(6)]
    for stem in stems:
        drop(inbox, stem, 6)
    daemon = DaemonProcess(config, fake_model=True, env=slurm)

    # Adapt asks for a second worker once it knows a job takes seconds: two worker jobs run at once.
    def two_busy() -> list[dict]:
        busy = [w for w in workers(outbox) if w.get("job") and w.get("slurm_job")]
        running = [job for job, state in slurm_jobs(slurm) if state == "RUNNING"]
        return busy if len(busy) == 2 and len(running) == 2 else []

    busy = wait_for(two_busy, 150, what="two Slurm workers busy at once", interval=0.25)
    victim = busy[0]
    subprocess.run(["scancel", victim["slurm_job"]], env=slurm, check=True)  # its job must run again elsewhere
    wait_for(lambda: all(finished(outbox, s) for s in stems) and daemon.log().count(" done model=") >= len(stems), 180,
             what="every job finished", interval=0.25)
    log = daemon.log()
    assert [progress_state(outbox, s) for s in stems] == ["done"] * len(stems), log[-3000:]
    assert [log.count(f"job {s} done ") for s in stems] == [1] * len(stems), log[-3000:]
    # A one-thread worker may hold two jobs (one waiting on it): the line names every job it held.
    lost = re.search(rf"dask worker {victim['name']} lost while running job ([^;]+);", log)
    assert lost and victim["job"] in lost.group(1).split(", "), log[-3000:]
    assert f"job {victim['job']} runs again on dask worker" in log, log[-3000:]
    ran_on = {s: read_json(outbox / f"{s}.geojson")["samwatch"]["worker"] for s in stems}
    assert all(worker["slurm_job"] and worker["name"].startswith("SLURMCluster-") for worker in ran_on.values())
    assert ran_on[victim["job"]]["slurm_job"] != victim["slurm_job"]  # its result came from the re-run elsewhere

    # Idle: adapt gives the worker jobs back (adapt_minimum 0).
    wait_for(lambda: not slurm_jobs(slurm), 90, what="the cluster scaled back to no worker", interval=0.5)

    # A job on a cold cluster again, then SIGTERM mid-job: it is requeued and no Slurm job is left.
    drop(inbox, "last", 60)
    wait_for(lambda: any(w.get("job") == "last" for w in workers(outbox)), 120, what="the last job on a worker")
    assert daemon.stop() == 0
    wait_for(lambda: not slurm_jobs(slurm), 30, what="no worker job left once the daemon stopped", interval=0.5)
    assert progress_state(outbox, "last") == "queued"
    stopped = read_json(outbox / "_samwatch" / "status.json")
    assert stopped["state"] == "stopped" and stopped["workers"] == []


@pytest.mark.slurm
@pytest.mark.subprocess
def test_worker_jobs_that_die_at_start_are_reported_and_the_stop_is_clean(tmp_path: Path, slurm: dict[str, str]) -> None:
    cluster = {"kind": "slurm", "queue": "ci", "cores": 1, "memory": "1GB", "adapt_maximum": 1,
               "python": "/nonexistent/venv/bin/python"}  # what a node without the daemon's venv sees
    config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "cluster": cluster})
    drop(tmp_path / "inbox", "a", 1)
    daemon = DaemonProcess(config, fake_model=True, env=slurm)
    wait_for(lambda: "no cluster worker has joined for 60 s with 1 job(s) waiting" in daemon.log(), 150,
             what="the starved-cluster warning", interval=0.5)
    assert "worker-logs" in daemon.log()
    assert daemon.stop() == 0
    assert progress_state(tmp_path / "outbox", "a") == "queued"
    wait_for(lambda: not slurm_jobs(slurm), 30, what="no worker job left")


def test_samwatch_check_runs_the_workers_python(tmp_path: Path) -> None:
    """The cluster block's python is checked where this machine can see it (no Slurm needed)."""
    def check(cluster: dict) -> subprocess.CompletedProcess:
        config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "cluster": cluster})
        return subprocess.run([sys.executable, "-m", "samwatch", "check", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)

    good = check({"python": sys.executable, "env": {"PYTHONPATH": str(ROOT)}})
    assert good.returncode == 0, good.stdout + good.stderr
    elsewhere = check({"python": "/nodes/only/venv/bin/python"})
    assert elsewhere.returncode == 0 and "note: config: executor.cluster.python" in elsewhere.stdout
    not_python = tmp_path / "not-python"
    not_python.write_text("plain text")
    refused = check({"python": str(not_python)})
    assert refused.returncode == 1 and "is not an executable file" in refused.stdout
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "bin").mkdir()
    os.symlink(shutil.which("python3") or "/usr/bin/python3", bare / "bin" / "python")  # no samwatch there
    missing = check({"venv": str(bare), "env": {"PYTHONPATH": ""}})
    assert missing.returncode == 1 and "cannot import samwatch" in missing.stdout, missing.stdout
