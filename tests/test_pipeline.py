"""The job pipeline: stages overlapped across jobs, outcomes as if run one by one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from samwatch.config import Config
from samwatch.jobs import JobRunner
from samwatch.models.pool import ModelPool
from samwatch.outbox import JobOutputs
from samwatch.pipeline import JobPipeline
from samwatch.weights.registry import WeightsRegistry
from samwatch.vocab import JobTicket, Outcome, Progress
from support import as_json, coins

SIDECARS = {
    "a": {"prompts": [{"bbox": [40, 40, 120, 110]}, {"bbox": [150, 50, 260, 160]}]},
    "bad": {"prompts": [{"bbox": [1, 2]}]},  # refused when read
    "off": {"prompts": [{"bbox": [10, 10, 9000, 90]}]},  # refused on the device stage
    "b": {"prompts": [{"bbox": [250, 180, 360, 290]}], "label": "cell"},
}


@pytest.fixture()
def runner(tmp_path: Path, vit_t_checkpoint: Path) -> JobRunner:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name, body in SIDECARS.items():
        Image.fromarray(coins()).save(inbox / f"{name}.png")
        (inbox / f"{name}.yaml").write_text(yaml.safe_dump({"model": "vit_t", **body}))
    config = Config(inbox=inbox, outbox=tmp_path / "outbox", state_dir=tmp_path / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    return JobRunner(config, WeightsRegistry(config.weights, config.state_dir),
                     ModelPool(torch.device("cpu"), config.models))


def _ticket(name: str) -> JobTicket:
    return JobTicket(name, f"{name}.yaml", f"{name}.png", "same-pixels", "v1")


def _progress(runner: JobRunner, name: str) -> Progress:
    return Progress(JobOutputs(runner.config.outbox, name), threading.Event())


def test_pipelined_outcomes_equal_one_by_one_in_order(runner: JobRunner) -> None:
    sequential = {name: runner.run(_ticket(name), _progress(runner, name)) for name in SIDECARS}
    features = {name: o.result["features"] for name, o in sequential.items() if o.state == "done"}
    finished: list[tuple[str, Outcome]] = []
    pipeline = JobPipeline()
    for name in SIDECARS:
        pipeline.submit(runner, _ticket(name), _progress(runner, name), lambda t, o: finished.append((t.job_id, o)))
    pipeline.close()
    assert [name for name, _ in finished if name != "bad"] == [n for n in SIDECARS if n != "bad"]
    for name, outcome in finished:
        assert outcome.state == sequential[name].state, (name, outcome.error)
        assert (outcome.error and outcome.error.code) == (sequential[name].error and sequential[name].error.code)
    assert dict(finished)["bad"].error.code == "sidecar_invalid"
    assert dict(finished)["off"].error.code == "prompt_out_of_bounds"
    piped = dict(finished)
    for name, expected in features.items():
        assert as_json([f["geometry"] for f in piped[name].result["features"]]) == as_json([f["geometry"] for f in expected])


def test_a_failure_while_writing_fails_that_job_only(runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    original = runner.finish

    def finish(job, detections):
        if job.ticket.job_id == "a":
            next(iter(detections))  # the device stage is mid-job, blocked on the handoff
            raise RuntimeError("disk on fire")
        return original(job, detections)

    monkeypatch.setattr(runner, "finish", finish)
    finished: dict[str, Outcome] = {}
    pipeline = JobPipeline()
    for name in ("a", "b"):
        pipeline.submit(runner, _ticket(name), _progress(runner, name), lambda t, o: finished.update({t.job_id: o}))
    pipeline.close()
    assert finished["a"].error.code == "internal_error"
    assert finished["b"].state == "done"


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []

    def running(self, stage: str, percent: float, message: str = "") -> None:
        self.stages.append(stage)


def test_a_job_read_ahead_waits_for_the_device_and_can_be_cancelled_there(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samwatch.vocab import WAITING_FOR_DEVICE
    from support import wait_for

    release = threading.Event()
    original = runner.infer

    def infer(job):
        if job.ticket.job_id == "a":
            release.wait(60)  # job a holds the device until the test lets it go
        yield from original(job)

    monkeypatch.setattr(runner, "infer", infer)
    sinks = {name: _Recorder() for name in ("a", "b")}
    flags = {name: threading.Event() for name in ("a", "b")}
    finished: dict[str, Outcome] = {}
    pipeline = JobPipeline()
    for name in ("a", "b"):
        pipeline.submit(runner, _ticket(name), Progress(sinks[name], flags[name]),
                        lambda t, o: finished.update({t.job_id: o}))
    wait_for(lambda: WAITING_FOR_DEVICE in sinks["b"].stages, 60, what="b read ahead, waiting")
    assert "encoding image" not in sinks["b"].stages
    flags["b"].set()  # its sidecar was deleted while it waited
    release.set()
    pipeline.close()
    assert finished["a"].state == "done" and finished["b"].state == "cancelled"
