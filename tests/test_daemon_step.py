"""The daemon driven in-process, one ``step(now)`` at a time, with a fake executor.

Only the executor is fake: watcher, ledger, claims, queueing, outcomes and the outbox are
the real ones on temp folders, so these tests pin the daemon's own decisions (what is
dispatched, requeued, cancelled, dropped) without threads or timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fakes import FakeExecutor
from samwatch.claims import ClaimStore
from samwatch.config import Config
from samwatch.daemon import Daemon
from samwatch.errors import JobCancelled, JobError
from samwatch.ledger import Ledger
from samwatch.weights.registry import WeightsRegistry
from samwatch.outbox import Outbox
from samwatch.watcher import Watcher
from samwatch.vocab import Outcome
from support import fake_weights, read_json, save_image, write_sidecar

SMALL = np.full((16, 16), 100, np.uint8)
RESULT = {"type": "FeatureCollection", "features": []}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path: Path):
    config = Config(
        inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", state_dir=tmp_path / "state", device="cpu",
        watch={"mode": "polling", "settle_seconds": 0.0, "poll_interval_seconds": 0.1},
        service={"instance": "step", "heartbeat_seconds": 1.0}, weights=fake_weights(tmp_path),
    )
    for folder in (config.inbox, config.outbox, config.state_dir):
        folder.mkdir(parents=True)
    clock = Clock()
    executor = FakeExecutor(slots=2)
    outbox = Outbox(config.outbox)
    outbox.ensure_folders()
    daemon = Daemon(
        config,
        ledger=Ledger(config.state_dir / "ledger.sqlite3"),
        registry=WeightsRegistry(config.weights, config.state_dir),
        claims=ClaimStore(outbox.state_folder / "claims", "step", 120.0),
        watcher=Watcher(config.inbox, mode="polling", settle_seconds=0.0, poll_interval=0.1, rescan_interval=60),
        executor=executor, outbox=outbox, clock=clock,
    )
    yield daemon, executor, clock
    daemon.close()


def advance(daemon: Daemon, clock: Clock, seconds: float = 0.2) -> None:
    clock.now += seconds
    daemon.step(clock.now)


def add_job(inbox: Path, stem: str, box: list[int] | None = None) -> None:
    save_image(inbox / f"{stem}.png", SMALL)
    write_sidecar(inbox / f"{stem}.yaml", {"prompts": [{"bbox": box or [1, 1, 8, 8]}]})


def progress(daemon: Daemon, stem: str) -> dict:
    return read_json(daemon.config.outbox / f"{stem}.progress.json")


def test_jobs_fill_every_slot_and_their_outcomes_land(rig) -> None:
    daemon, executor, clock = rig
    for stem in ("a", "b", "c"):
        add_job(daemon.config.inbox, stem)
    advance(daemon, clock)
    advance(daemon, clock)
    assert sorted(d.ticket.job_id for d in executor.in_flight.values()) == ["a", "b"]  # two slots
    assert progress(daemon, "c")["state"] == "queued"
    executor.progress("a", "decoding prompts", 60)
    advance(daemon, clock)
    assert progress(daemon, "a")["percent"] == 60
    status = read_json(daemon.outbox.state_folder / "status.json")
    assert {job["job"] for job in status["running"]} == {"a", "b"}
    executor.finish("a", Outcome("done", features=0, result=RESULT, summary="job a done"))
    advance(daemon, clock)
    assert progress(daemon, "a")["state"] == "done"
    assert read_json(daemon.config.outbox / "a.geojson") == RESULT
    assert "c" in {d.ticket.job_id for d in executor.in_flight.values()}  # the freed slot took c
    # status.json follows the job files within a step, not a heartbeat later
    assert {job["job"] for job in read_json(daemon.outbox.state_folder / "status.json")["running"]} == {"b", "c"}


def test_changed_inputs_requeue_and_a_removed_sidecar_cancels(rig) -> None:
    daemon, executor, clock = rig
    add_job(daemon.config.inbox, "a")
    add_job(daemon.config.inbox, "b")
    advance(daemon, clock)
    first = executor.dispatch_of("a")
    write_sidecar(daemon.config.inbox / "a.yaml", {"prompts": [{"bbox": [2, 2, 9, 9]}]})
    (daemon.config.inbox / "b.yaml").unlink()
    advance(daemon, clock)
    assert first.token in executor.cancelled and executor.dispatch_of("b").token in executor.cancelled
    stopped = JobCancelled("stopped")
    executor.finish("a", Outcome("cancelled", error=stopped))
    executor.finish("b", Outcome("cancelled", error=stopped))
    advance(daemon, clock)
    assert progress(daemon, "b")["state"] == "cancelled"
    assert daemon.ledger.get("b").state == "cancelled"
    second = executor.dispatch_of("a")  # requeued, not cancelled: its new version runs
    assert second.token != first.token and second.ticket.version != first.ticket.version


def test_a_late_outcome_of_an_abandoned_run_is_dropped(rig) -> None:
    daemon, executor, clock = rig
    add_job(daemon.config.inbox, "a")
    advance(daemon, clock)
    stale = executor.dispatch_of("a").token
    executor.finish("a", Outcome("failed", error=JobError("internal_error", "worker lost")))
    advance(daemon, clock)
    assert progress(daemon, "a")["state"] == "failed"
    executor.finish("a", Outcome("done", result=RESULT, summary="late"), token=stale)  # delivered twice
    advance(daemon, clock)
    assert progress(daemon, "a")["state"] == "failed"
    assert not (daemon.config.outbox / "a.geojson").exists()
    assert daemon.recorder.stats.done == 0 and daemon.recorder.stats.failed == 1


def test_stopping_requeues_the_running_job_and_says_so(rig) -> None:
    daemon, executor, clock = rig
    add_job(daemon.config.inbox, "a")
    advance(daemon, clock)
    executor.progress("a", "decoding prompts", 32)
    advance(daemon, clock)
    daemon.flags.stop = True
    executor.finish("a", Outcome("cancelled", error=JobCancelled("stopping")))
    advance(daemon, clock)
    state = progress(daemon, "a")
    assert state["state"] == "queued" and "runs again" in state["message"]
    assert daemon.ledger.get("a").state == "queued"


def test_a_job_waiting_for_the_device_is_not_a_stall(rig) -> None:
    daemon, executor, clock = rig
    for stem in ("a", "b"):
        add_job(daemon.config.inbox, stem)
    advance(daemon, clock)
    advance(daemon, clock)
    limit = daemon.config.service.job_stall_seconds
    executor.progress("b", "waiting for the device", 5)
    for _ in range(3):  # a keeps reporting progress on the device while b waits behind it
        executor.progress("a", "decoding prompts", 50)
        advance(daemon, clock, limit / 2)
    assert not daemon.reporter.job_stalled()
    advance(daemon, clock, limit * 2)  # a goes silent: that is a stall
    assert daemon.reporter.job_stalled()
