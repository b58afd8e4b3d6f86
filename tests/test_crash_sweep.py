"""Exactly once at every instant: the daemon stopped at each named instant of a job's life.

In the manner of SQLite's crash tests: a dry run records every instant the jobs pass
(samwatch/faults.py: queued, each stage, each write with its temporary at 0 %, 50 % and
100 % of its bytes, after the renames, after the ledger commit), then one run per instant
stops the daemon there and a fresh daemon goes on from what the disk holds (crash_rig.py).
After each restart: exactly one complete outcome per job, no temporary left, the progress
file final, and a job the ledger had recorded not run again. SIGTERM with ``--grace 0`` and a
full disk at each write are swept the same way, outcomes from a Dask worker too, and a few real
``kill -9`` of the subprocess daemon at the writing instants.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import fakes
from crash_rig import (
    INLINE, PIPELINED, REFUSED, WRITES, Setup, all_final, broken, crash_at, enospc_at, jobs_for, ledger_states, of_job,
    outcome_writes, sigterm_at, sweep, writes,
)
from samwatch import faults
from samwatch.atomic import TMP_PREFIX
from support import DaemonProcess, fake_weights, wait_for, write_config


@pytest.fixture(autouse=True)
def disarmed():
    yield
    faults.arm(None)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Iterator[Path]:
    """The sweep's folders in memory (tmpfs) where the machine has one: a kill is a copy here, so
    the disk's durability plays no part, and a hundred daemons' file writes cost a third less."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="samwatch-sweep-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_kill_9_at_every_instant_of_one_job(sweep_dir: Path) -> None:
    sweep(sweep_dir, ["a"], crash_at, setup=INLINE)


def test_kill_9_at_every_instant_of_a_failed_job(sweep_dir: Path) -> None:
    sweep(sweep_dir, ["bad"], crash_at, setup=INLINE, life=REFUSED)


def test_kill_9_at_every_instant_with_three_jobs_in_flight(sweep_dir: Path) -> None:
    """Pipelined slots (depth 3): results encoded on the slot's writing thread, three jobs at once;
    the instants of the middle one, with the others ahead of it and behind it in the pipeline."""
    sweep(sweep_dir, ["a", "b", "bad"], crash_at, setup=PIPELINED, keep=of_job("b"))


@pytest.mark.parametrize("then", ["freed", "freed, spool full", "crash", "crash, spool full"])
def test_disk_full_at_every_write(sweep_dir: Path, then: str) -> None:
    """ENOSPC at each write of a done and a failed job: kept and written later, spooled and written
    after a restart, or (the spool's disk full too) the job runs again after the restart."""
    how = partial(enospc_at, then=then)
    how.__name__ = f"enospc ({then})"
    sweep(sweep_dir, ["a", "bad"], how, setup=INLINE, keep=writes if then == "freed" else outcome_writes,
          life={"write 50%"})


def test_sigterm_with_no_grace_at_every_instant(sweep_dir: Path) -> None:
    sweep(sweep_dir, ["a", "b"], sigterm_at, setup=PIPELINED, keep=of_job("b"))


# ---- real kill -9 and SIGTERM of the subprocess daemon (samwatch/faults.py's SAMWATCH_FAULT) ------


@pytest.mark.subprocess
@pytest.mark.parametrize("fault", [
    "write 0%@a.geojson=kill", "write 50%@a.geojson=kill", "write 100%@a.geojson=kill", "write 50%@a.geojson=term",
])
def test_the_subprocess_daemon_stopped_at_an_instant(tmp_path: Path, fault: str) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path), output={"formats": ["geojson", "labels"]})
    expected = jobs_for(tmp_path / "inbox", ["a"])
    outbox = tmp_path / "outbox"
    first = DaemonProcess(config, "--grace", "0", fake_model=True, env={faults.ENV: fault})
    code = first.proc.wait(timeout=60)
    first.stop()
    killed = fault.endswith("=kill")
    assert code == (-9 if killed else 0), first.log()[-3000:]
    if fault.startswith("write"):  # stopped with the result's temporary there (SIGTERM: a clean stop)
        assert bool(list(outbox.glob(f"{TMP_PREFIX}*"))) == killed
    recorded = ledger_states(tmp_path)
    second = DaemonProcess(config, fake_model=True)
    wait_for(lambda: " started inbox=" in second.log() and all_final(tmp_path, ["a"]), 60,
             what=f"a final after the restart\n{second.log()[-3000:]}")
    assert second.stop() == 0
    log = second.log()
    started = Counter({"a": log.count("job a started")})
    assert broken(tmp_path, expected, recorded, started) == [], log[-3000:]
    assert (recorded.get("a") == "done") == ("job a started" not in log)


# ---- outcomes that come back from a Dask worker ---------------------------------------------------


@pytest.fixture(scope="module")
def dask_scheduler():
    distributed = pytest.importorskip("distributed")
    # Workers in this process, so that a step's instants stay ours; each given the fake model family.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        for worker in cluster.workers.values():
            fakes.dask_setup(worker)
        yield cluster.scheduler_address


def test_kill_9_at_every_instant_of_outcomes_from_a_dask_worker(sweep_dir: Path, dask_scheduler: str) -> None:
    """The worker runs the job; the daemon writes what comes back: every instant of that, and the
    queued one before it (a worker's stages report through Dask's events, not through faults.py,
    and how many progress writes they cause varies too much between runs to sweep them)."""
    sweep(sweep_dir, ["a", "bad"], crash_at, setup=Setup("dask", threaded=False, dask=dask_scheduler),
          keep=lambda instant: not instant[1].endswith(".progress.json"), life={"queued", *WRITES, "renamed", "recorded"})

