"""Jobs on a Dask cluster: a LocalCluster of two worker processes with the fake model.

One cluster for the module (worker processes are slow to start on two cores); each test runs
``samwatch run`` as a subprocess against its scheduler, as a facility would.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from support import DaemonProcess, fake_weights, finished, progress_state, read_json, save_image, wait_for, write_config, write_sidecar
from test_service import SMALL

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    import cloudpickle

    import fakes

    cloudpickle.register_pickle_by_value(fakes)  # the workers cannot import tests/
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        with distributed.Client(local) as client:
            client.register_plugin(fakes.worker_plugin())
            yield local, client


def dask_config(tmp_path: Path, cluster, **extra) -> Path:
    local, _ = cluster
    return write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "address": local.scheduler_address}, **extra)


def drop(inbox: Path, stem: str, label: str) -> None:
    save_image(inbox / f"{stem}.png", SMALL)
    write_sidecar(inbox / f"{stem}.yaml", {"label": label, "prompts": [{"bbox": [1, 1, 9, 9]}]})


def status(outbox: Path) -> dict:
    return read_json(outbox / "_samwatch" / "status.json") or {}


def busy_workers(outbox: Path) -> set[str]:
    return {w["name"] for w in status(outbox).get("workers", []) if w.get("job")}


@pytest.mark.subprocess
def test_jobs_spread_over_both_workers_and_a_killed_worker_costs_no_outcome(tmp_path: Path, cluster) -> None:
    _, client = cluster
    config = dask_config(tmp_path, cluster)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    stems = [f"j{index}" for index in range(4)]
    for stem in stems:
        drop(inbox, stem, "slow:4")  # long enough for status.json (workers sampled every 2 s) to catch both busy
    wait_for(lambda: len(busy_workers(outbox)) == 2, 60, what="both workers busy")
    assert status(outbox)["executor"]["kind"] == "dask"
    # Kill the process of a worker mid-job: the scheduler runs that job elsewhere.
    victim = next(w for w in status(outbox)["workers"] if w.get("job"))
    pids = client.run(os.getpid)
    address = next(a for a in pids if str(client.scheduler_info()["workers"][a]["name"]) == victim["name"])
    os.kill(pids[address], signal.SIGKILL)
    wait_for(lambda: all(finished(outbox, s) for s in stems) and daemon.log().count(" done model=") >= len(stems), 120,
             what="every job finished and logged")
    log = daemon.log()
    assert all(progress_state(outbox, s) == "done" for s in stems), log[-3000:]
    assert [log.count(f"job {s} done ") for s in stems] == [1] * len(stems)
    assert f"dask worker {victim['name']} lost while running job {victim['job']}" in log, log[-3000:]
    assert f"job {victim['job']} runs again on dask worker" in log, log[-3000:]
    ran_on = {read_json(outbox / f"{s}.geojson")["samwatch"]["worker"]["name"] for s in stems}
    assert len(ran_on) == 2  # which worker ran each job, in its result
    wait_for(lambda: sum(w.get("done", 0) for w in status(outbox)["workers"]) == len(stems), 10, what="per-worker counts")
    assert daemon.stop() == 0
    stopped = status(outbox)
    assert stopped["state"] == "stopped" and stopped["workers"] == []


@pytest.mark.subprocess
def test_deleting_a_sidecar_cancels_its_job_on_a_worker(tmp_path: Path, cluster) -> None:
    config = dask_config(tmp_path, cluster)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    drop(inbox, "long", "slow:60")
    wait_for(lambda: (read_json(outbox / "long.progress.json") or {}).get("percent", 0) > 40, 60, what="progress from the worker")
    (inbox / "long.yaml").unlink()
    wait_for(lambda: progress_state(outbox, "long") == "cancelled", 30, what="cancelled")
    drop(inbox, "after", "slow:0.2")  # the worker is free again: the cooperative flag stopped it
    wait_for(lambda: progress_state(outbox, "after") == "done", 60, what="next job")
    assert daemon.stop() == 0


@pytest.mark.subprocess
def test_daemon_killed_with_jobs_on_the_cluster_loses_and_doubles_none(tmp_path: Path, cluster) -> None:
    config = dask_config(tmp_path, cluster)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stems = [f"k{index}" for index in range(5)]
    for stem in stems:
        drop(inbox, stem, "slow:1")
    first = DaemonProcess(config, fake_model=True)
    wait_for(lambda: sum(progress_state(outbox, s) == "done" for s in stems) >= 1 and busy_workers(outbox), 90, what="some done, some running")
    first.kill()
    done_before = {s for s in stems if progress_state(outbox, s) == "done"}
    assert len(done_before) < len(stems)
    second = DaemonProcess(config, fake_model=True)
    wait_for(lambda: all(progress_state(outbox, s) == "done" for s in stems), 120, what="all done after restart")
    assert second.stop() == 0
    logs = first.log() + second.log()
    for stem in stems:
        assert logs.count(f"job {stem} done ") == 1, stem
        assert (stem in done_before) != (f"job {stem} done " in second.log())


@pytest.mark.subprocess
def test_a_job_on_a_worker_writes_what_it_writes_locally_and_names_its_worker(tmp_path: Path, cluster) -> None:
    outputs = {}
    for kind in ("local", "dask"):
        root = tmp_path / kind
        root.mkdir()
        executor = {"kind": "dask", "address": cluster[0].scheduler_address} if kind == "dask" else "local"
        config = write_config(root, fake_weights(root), executor=executor, output={"formats": ["geojson", "labels"]})
        drop(root / "inbox", "c", "cell")
        daemon = DaemonProcess(config, fake_model=True)
        wait_for(lambda: finished(root / "outbox", "c"), 120, what=f"{kind} job")
        assert daemon.stop() == 0
        assert progress_state(root / "outbox", "c") == "done", daemon.log()[-2000:]
        outbox = root / "outbox"
        files = {path.name: path.read_bytes() for path in outbox.iterdir() if path.name.startswith("c.") and path.is_file()}
        result = read_json(outbox / "c.geojson")
        outputs[kind] = (files, result)
    (local_files, local), (dask_files, dask) = outputs["local"], outputs["dask"]
    assert sorted(dask_files) == sorted(local_files)
    assert {"c.preview.png", "c.labels.tif", "c.labels.csv"} <= set(dask_files)
    for name in ("c.preview.png", "c.labels.csv"):
        assert dask_files[name] == local_files[name], name
    assert dask["features"] == local["features"]
    assert local["samwatch"]["worker"]["executor"] == "local" and local["samwatch"]["worker"]["name"] == "local-0"
    names = {str(info["name"]) for info in cluster[1].scheduler_info()["workers"].values()}
    assert dask["samwatch"]["worker"]["executor"] == "dask" and dask["samwatch"]["worker"]["name"] in names
    assert dask["samwatch"]["worker"]["host"]


TILED = {"tiling": {"tile_size": 256, "overlap": 32}}  # a 900 x 700 image: 4 x 3 tiles


def painted_image(path: Path) -> None:
    """Three painted objects on black: one across a seam, a bar through every column, one inside a tile."""
    pixels = np.zeros((700, 900, 3), np.uint8)
    yy, xx = np.ogrid[:700, :900]
    pixels[(xx - 240) ** 2 + (yy - 150) ** 2 <= 30 ** 2] = (255, 0, 0)
    pixels[400:430, 50:850] = (0, 255, 0)
    pixels[(xx - 600) ** 2 + (yy - 580) ** 2 <= 20 ** 2] = (0, 0, 255)
    save_image(path, pixels)


def local_and_dask(tmp_path: Path, cluster, image: str, make_image, body: dict) -> tuple[dict, dict]:  # noqa: ANN001
    """The result of one job run by a local daemon, then by one on the cluster."""
    results = {}
    stem = Path(image).stem
    for kind in ("local", "dask"):
        root = tmp_path / kind
        root.mkdir()
        executor = {"kind": "dask", "address": cluster[0].scheduler_address} if kind == "dask" else "local"
        config = write_config(root, fake_weights(root), executor=executor)
        make_image(root / "inbox" / image)
        write_sidecar(root / "inbox" / f"{stem}.yaml", body)
        daemon = DaemonProcess(config, fake_model=True)
        wait_for(lambda: finished(root / "outbox", stem), 120, what=f"{kind} job")
        assert daemon.stop() == 0
        assert progress_state(root / "outbox", stem) == "done", daemon.log()[-2000:]
        results[kind] = read_json(root / "outbox" / f"{stem}.geojson")
    return results["local"], results["dask"]


@pytest.mark.subprocess
def test_a_tiled_jobs_tiles_run_on_both_workers_and_give_the_local_result(tmp_path: Path, cluster) -> None:
    local, dask = local_and_dask(tmp_path, cluster, "p.png", painted_image, {"label": "painted slow:0.2", **TILED})
    assert len(local["features"]) == 3 and dask["features"] == local["features"]
    tiling, local_tiling = dask["samwatch"]["tiling"], local["samwatch"]["tiling"]
    names = {str(info["name"]) for info in cluster[1].scheduler_info()["workers"].values()}
    assert set(tiling["tile_workers"]) == names and len(names) == 2, tiling
    assert sum(tiling["tile_workers"].values()) == tiling["tiles"] == local_tiling["tiles"] == 12
    assert "tile_workers" not in local_tiling  # the local executor runs a job's tiles in its slot


def painted_stack(path: Path) -> None:
    """Six planes of a Z stack, each with its disc elsewhere and of its own grey."""
    import tifffile

    planes = np.zeros((6, 200, 240), np.uint8)
    yy, xx = np.ogrid[:200, :240]
    for index, plane in enumerate(planes):
        plane[(xx - 40 - 30 * index) ** 2 + (yy - 100) ** 2 <= 15 ** 2] = 100 + 20 * index
    tifffile.imwrite(path, planes, metadata={"axes": "ZYX"})


@pytest.mark.subprocess
def test_a_stacks_planes_run_on_both_workers_and_give_the_local_result(tmp_path: Path, cluster) -> None:
    local, dask = local_and_dask(tmp_path, cluster, "z.tif", painted_stack, {"label": "painted slow:0.2", "automask": {}})
    assert len(local["features"]) == 6 and dask["features"] == local["features"]
    names = {str(info["name"]) for info in cluster[1].scheduler_info()["workers"].values()}
    workers = dask["samwatch"]["frame_workers"]
    assert set(workers) == names and sum(workers.values()) == 6, workers
    assert "frame_workers" not in local["samwatch"]  # the local executor runs a job's planes in its slot


def unit_tasks(client, since: float) -> list[dict]:  # noqa: ANN001
    """The tile tasks the cluster ran to their end since ``since``."""
    return [record for record in client.get_task_stream(start=since) if str(record["key"]).startswith("samwatch_unit-")]


@pytest.mark.subprocess
def test_cancelling_a_spread_job_stops_its_remaining_tiles(tmp_path: Path, cluster) -> None:
    import time

    _, client = cluster
    config = dask_config(tmp_path, cluster)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    save_image(inbox / "big.png", np.zeros((1000, 1300, 3), np.uint8))  # 6 x 5 tiles of 0.5 s
    client.get_task_stream()  # the scheduler records task ends from now on
    since = time.time()
    daemon = DaemonProcess(config, fake_model=True)
    write_sidecar(inbox / "big.yaml", {"label": "slow:0.5", **TILED})
    wait_for(lambda: len(unit_tasks(client, since)) >= 4, 90, what="some tiles done")
    (inbox / "big.yaml").unlink()
    wait_for(lambda: progress_state(outbox, "big") == "cancelled", 30, what="cancelled")
    drop(inbox, "after", "slow:0.2")  # both workers free again: the tiles still pending were cancelled
    wait_for(lambda: progress_state(outbox, "after") == "done", 60, what="next job")
    ran = len(unit_tasks(client, since))
    assert ran < 20, ran  # of 30: at most those in flight (two per worker thread) ran after the cancel
    assert daemon.stop() == 0


@pytest.mark.subprocess
def test_a_real_vit_t_job_on_the_cluster_equals_the_local_result(tmp_path: Path, cluster, vit_t_checkpoint: Path) -> None:
    _, client = cluster
    client.unregister_worker_plugin("samwatch-fake-model")  # the real model families from here on (the last test of the module)
    from support import coins

    weights = [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}]
    results = {}
    for kind in ("local", "dask"):
        root = tmp_path / kind
        root.mkdir()
        executor = {"kind": "dask", "address": cluster[0].scheduler_address} if kind == "dask" else "local"
        config = write_config(root, weights, executor=executor)
        save_image(root / "inbox" / "c.png", coins())
        write_sidecar(root / "inbox" / "c.yaml", {"prompts": [{"bbox": [40, 40, 120, 110]}, {"points": [[200, 150]]}]})
        daemon = DaemonProcess(config)
        wait_for(lambda: finished(root / "outbox", "c"), 240, what=f"{kind} job")
        assert daemon.stop() == 0
        assert progress_state(root / "outbox", "c") == "done", daemon.log()[-2000:]
        results[kind] = read_json(root / "outbox" / "c.geojson")["features"]
    assert results["dask"] == results["local"] and results["local"]


def test_a_job_error_crosses_a_pickle_whole() -> None:
    """A tile's failure on a worker comes back through pickle as its job's error."""
    import pickle

    from samwatch.errors import JobCancelled, JobError

    error = pickle.loads(pickle.dumps(JobError("image_unreadable", "Cannot read it.", file="a.png", field="image", page=3)))
    assert type(error) is JobError and error.to_dict() == {
        "error": "image_unreadable", "message": "Cannot read it.", "file": "a.png", "field": "image", "page": 3}
    assert type(pickle.loads(pickle.dumps(JobCancelled()))) is JobCancelled


def test_jobqueue_clusters_are_configured_without_a_batch_system() -> None:
    from samwatch.config import Config
    from samwatch.executors.jobqueue import jobqueue_arguments

    config = Config(executor={"kind": "dask", "cluster": {
        "kind": "slurm", "queue": "gpu", "cores": 8, "memory": "64GB", "gpus": 1, "walltime": "08:00:00",
        "adapt_minimum": 0, "adapt_maximum": 10,
    }})
    assert jobqueue_arguments(config.executor.cluster) == {
        "cores": 8, "memory": "64GB", "processes": 1, "job_extra_directives": ["--gres=gpu:1"],
        "queue": "gpu", "walltime": "08:00:00",
    }
    with pytest.raises(ValueError, match="exactly one of address or cluster"):
        Config(executor={"kind": "dask"})


@pytest.fixture(scope="module")
def threads_cluster():
    """A cluster of one worker of two threads inside this process, on the fake model (an in-process
    daemon's jobs; a job's thread secedes while its tiles run, so the worker takes them)."""
    import fakes

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as local:
        for worker in local.workers.values():
            fakes.dask_setup(worker)
        yield local.scheduler_address


@pytest.mark.parametrize("worker_mount", ["elsewhere", "missing"])
def test_workers_read_inputs_through_the_path_map(tmp_path: Path, threads_cluster: str, worker_mount: str) -> None:
    """The share is srv/ here and mnt/ on the workers (a symlink stands in for the second mount):
    an inbox image and one a sidecar names under inputs.image_roots are read on the worker at
    their mapped paths; a worker without that mount says which path it could not find."""
    from support import InProcessDaemon

    share, mount = tmp_path / "srv", tmp_path / "mnt"
    slides = share / "slides"
    slides.mkdir(parents=True)
    if worker_mount == "elsewhere":
        mount.symlink_to(share)
    config = write_config(share, fake_weights(share), inputs={"image_roots": [str(slides)]},
                          executor={"kind": "dask", "address": threads_cluster, "path_map": {str(share): str(mount)}})
    save_image(slides / "s.png", SMALL)
    write_sidecar(share / "inbox" / "s.yaml", {"image": str(slides / "s.png"), "prompts": [{"bbox": [1, 1, 9, 9]}]})
    drop(share / "inbox", "i", "cell")
    read_at = {"s": mount / "slides" / "s.png", "i": mount / "inbox" / "i.png"}
    with InProcessDaemon(config) as daemon:
        daemon.run_until(lambda: all(finished(share / "outbox", stem) for stem in read_at), 60, what="the jobs on the worker")
    for stem, path in read_at.items():
        if worker_mount == "elsewhere":
            assert progress_state(share / "outbox", stem) == "done", daemon.log()[-2000:]
            result = read_json(share / "outbox" / f"{stem}.geojson")
            assert result["samwatch"]["worker"]["executor"] == "dask"
            if stem == "s":  # an inbox image is named inbox-relative, the same on both sides
                assert result["samwatch"]["image"]["path"] == str(path)
        else:
            error = read_json(share / "outbox" / f"{stem}.error.json")
            assert error["error"] == "image_not_found" and error["file"] == str(path), error
            assert error["message"].startswith(f"The Dask worker 0 finds no file at {path},"), error
            assert "executor.path_map" in error["message"]


def test_status_shows_the_tiles_a_worker_runs_for_a_spread_job(tmp_path: Path, threads_cluster: str) -> None:
    from support import InProcessDaemon

    from samwatch.cli.status_view import render_plain
    from samwatch.control.dashboard import render

    config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "address": threads_cluster})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    save_image(inbox / "big.png", np.zeros((1000, 1300, 3), np.uint8))  # 6 x 5 tiles of 0.2 s, one at a time
    write_sidecar(inbox / "big.yaml", {"label": "slow:0.2", **TILED})
    shown: list[dict] = []

    def tiles_shown() -> bool:
        heartbeat = status(outbox)
        if any(worker.get("units") for worker in heartbeat.get("workers", [])):
            shown.append(heartbeat)
        return finished(outbox, "big")

    with InProcessDaemon(config) as daemon:
        daemon.run_until(tiles_shown, 120, what="the spread job")
    assert progress_state(outbox, "big") == "done", daemon.log()[-2000:]
    assert shown, "no heartbeat showed the job's tiles on its worker"
    (worker,) = shown[-1]["workers"]
    assert set(worker["units"]) == {"big"} and worker["units"]["big"] >= 1
    assert f"{worker['units']['big']} tiles/planes of big" in render_plain(shown[-1], 0.0, False, [])
    assert f"<td>{worker['units']['big']} of big</td>" in render([shown[-1]])


@pytest.mark.parametrize("grew", [True, False])
def test_a_worker_gives_back_what_a_job_that_grew_it_used(tmp_path: Path, threads_cluster: str, grew: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """As the local executor does (memory.PeakMeter decides: tests/test_memory.py), so that a big
    job's freed memory does not stay with a worker that lives as long as its batch job."""
    from support import InProcessDaemon

    from samwatch.executors import dask
    from samwatch.memory import PeakMeter

    given: list[str] = []
    monkeypatch.setattr(PeakMeter, "worth_giving_back", lambda self, started_at: grew)
    monkeypatch.setattr(dask, "give_back", lambda: given.append("given back"))
    config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "address": threads_cluster})
    drop(tmp_path / "inbox", "j", "cell")
    with InProcessDaemon(config) as daemon:
        daemon.run_until(lambda: finished(tmp_path / "outbox", "j"), 60, what="the job on the worker")
    assert progress_state(tmp_path / "outbox", "j") == "done"
    assert given == (["given back"] if grew else [])
