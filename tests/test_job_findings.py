"""Discovery's findings travel with the ticket: a job reads its sidecar once, from the bytes
its version was computed from, opens its slide once with the config's limits, and fails with
the image error discovery found."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import samwatch.media.read
import samwatch.sidecars.load
from fakes import fake_adapters
from samwatch.config import Config
from samwatch.control.daemon import Daemon
from samwatch.control.outbox import JobOutputs
from samwatch.errors import JobError
from samwatch.job.runner import JobRunner
from samwatch.models.pool import ModelPool
from samwatch.vocab import JobTicket, Progress
from samwatch.weights.registry import WeightsRegistry
from slides import dense_slide, write_ome_pyramid
from support import fake_weights, read_json, save_image, write_sidecar

SMALL = np.full((16, 16), 100, np.uint8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(tmp_path: Path, **extra) -> Config:
    return Config(
        inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", state_dir=tmp_path / "state", device="cpu",
        watch={"mode": "polling", "settle_seconds": 0.0, "poll_interval_seconds": 0.1},
        service={"instance": "findings"}, weights=fake_weights(tmp_path), **extra,
    )


def run_until_settled(daemon: Daemon, clock: Clock, steps: int = 5) -> None:
    for _ in range(steps):
        clock.now += 0.2
        daemon.step(clock.now)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, Counter]:
    """(reads, parses) of sidecar files by inbox-relative name."""
    reads: Counter = Counter()
    parses: Counter = Counter()
    read, parse = samwatch.sidecars.load.read_sidecar_bytes, samwatch.sidecars.load.parse_sidecar_text

    def counting_read(path: Path, *, max_bytes: int, name: str) -> bytes:
        reads[name] += 1
        return read(path, max_bytes=max_bytes, name=name)

    def counting_parse(text: str | bytes, *, name: str) -> dict:
        parses[name] += 1
        return parse(text, name=name)

    monkeypatch.setattr(samwatch.sidecars.load, "read_sidecar_bytes", counting_read)
    monkeypatch.setattr(samwatch.sidecars.load, "parse_sidecar_text", counting_parse)
    return reads, parses


def test_a_local_job_reads_and_parses_its_sidecar_once(tmp_path: Path, counted: tuple[Counter, Counter]) -> None:
    reads, parses = counted
    config = make_config(tmp_path)
    clock = Clock()
    daemon = Daemon.from_config(config, threaded=False, clock=clock, adapters=fake_adapters)
    try:
        write_sidecar(config.inbox / "exp" / "samwatch.yaml", {"label": "from-defaults"})
        save_image(config.inbox / "exp" / "a.png", SMALL)
        write_sidecar(config.inbox / "exp" / "a.yaml", {"prompts": [{"bbox": [2, 3, 10, 12]}]})
        run_until_settled(daemon, clock)
        assert read_json(config.outbox / "exp" / "a.progress.json")["state"] == "done"
        (feature,) = read_json(config.outbox / "exp" / "a.geojson")["features"]
        assert feature["properties"]["label"] == "from-defaults"  # discovery's folder defaults reached the job
    finally:
        daemon.close()
    assert (reads["exp/a.yaml"], parses["exp/a.yaml"]) == (1, 1)


def fake_runner(config: Config) -> JobRunner:
    registry = WeightsRegistry(config.weights, config.state_dir)
    return JobRunner(config, registry, ModelPool(torch.device("cpu"), config.models, adapters=fake_adapters))


@pytest.fixture
def daemon(tmp_path: Path):
    clock = Clock()
    daemon = Daemon.from_config(make_config(tmp_path), threaded=False, clock=clock, adapters=fake_adapters)
    yield daemon, clock
    daemon.close()


def ticket_of(daemon: Daemon, job_id: str) -> JobTicket:
    return daemon.queue.ticket_of(daemon.ledger.get(job_id))


def test_a_sidecar_changed_while_queued_runs_the_bytes_of_its_version(daemon) -> None:
    """The ticket holds the bytes its version was hashed from; the change is a new version."""
    daemon, clock = daemon
    inbox = daemon.config.inbox
    save_image(inbox / "a.png", SMALL)
    first = write_sidecar(inbox / "a.yaml", {"prompts": [{"bbox": [2, 3, 10, 12]}]}).read_bytes()
    run_until_settled(daemon, clock)
    ticket = ticket_of(daemon, "a")
    assert ticket.sidecar_bytes == first and (ticket.model_type, ticket.weights_name) == ("vit_t", "default")
    expected = hashlib.sha256("\n".join(["a.png", "a.yaml", ticket.image_sha,
                                         hashlib.sha256(first).hexdigest()]).encode()).hexdigest()
    assert ticket.version == expected

    write_sidecar(inbox / "a.yaml", {"prompts": [{"bbox": [1, 1, 4, 4]}, {"bbox": [5, 5, 9, 9]}]})
    outcome = fake_runner(daemon.config).run(ticket, Progress(JobOutputs(daemon.config.outbox, "a"), threading.Event()))
    assert outcome.state == "done" and outcome.features == 1  # the queued version's one prompt

    run_until_settled(daemon, clock)
    assert daemon.ledger.get("a").version != ticket.version  # the new bytes are the next version
    assert ticket_of(daemon, "a").sidecar_bytes == (inbox / "a.yaml").read_bytes()


def test_the_image_error_found_at_discovery_is_the_jobs(daemon) -> None:
    daemon, clock = daemon
    write_sidecar(daemon.config.inbox / "b.yaml", {"image": "missing.png", "prompts": [{"bbox": [1, 1, 4, 4]}]})
    run_until_settled(daemon, clock)
    ticket = ticket_of(daemon, "b")
    assert ticket.image is None and ticket.image_error["error"] == "image_not_found"
    error = read_json(daemon.config.outbox / "b.error.json")
    assert {key: error[key] for key in ticket.image_error} == ticket.image_error


def test_a_ticket_fails_with_its_image_error_without_looking_at_the_disk(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.inbox.mkdir(parents=True)
    write_sidecar(config.inbox / "c.yaml", {"prompts": [{"bbox": [1, 1, 4, 4]}]})
    save_image(config.inbox / "c.png", SMALL)  # there now, but discovery found none
    error = JobError("image_not_found", "No image named c.<png|jpg|tif|...> next to the sidecar.", file="c.yaml",
                     field="image")
    ticket = JobTicket("c", "c.yaml", None, None, "v1", image_error=error.to_dict())
    outcome = fake_runner(config).run(ticket, Progress(JobOutputs(config.outbox, "c"), threading.Event()))
    assert outcome.state == "failed" and outcome.error.to_dict() == error.to_dict()


def test_a_slide_is_opened_once_per_job_with_the_configs_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"max_slide_pixels": 3_000_000, "max_image_pixels": 2_500_000}
    config = make_config(tmp_path, limits=limits)
    opened: list = []
    real = samwatch.media.read.open_slide

    def counting(path: Path, *, limits, channels):  # noqa: ANN001, ANN202
        opened.append(limits)
        return real(path, limits=limits, channels=channels)

    monkeypatch.setattr(samwatch.media.read, "open_slide", counting)
    clock = Clock()
    daemon = Daemon.from_config(config, threaded=False, clock=clock, adapters=fake_adapters)
    try:
        write_ome_pyramid(config.inbox / "s.tif", dense_slide(1024, 1024), levels=2)
        write_sidecar(config.inbox / "s.yaml", {"prompts": [{"bbox": [40, 40, 300, 200]}],
                                                 "tiling": {"tile_size": 512, "overlap": 64}})
        run_until_settled(daemon, clock)
        assert read_json(config.outbox / "s.progress.json")["state"] == "done"
        assert (config.outbox / "s.preview.png").is_file()
    finally:
        daemon.close()
    assert len(opened) == 1
    assert (opened[0].max_slide_pixels, opened[0].max_image_pixels) == (3_000_000, 2_500_000)


class _Client:
    """What DaskExecutor.submit touches of a client: the job it hands over is kept."""

    class scheduler:  # noqa: N801
        address = "inproc://fake"

    def __init__(self) -> None:
        self.jobs: list = []

    def subscribe_topic(self, topic: str, handler) -> None:  # noqa: ANN001
        pass

    def submit(self, fn, job, **options):  # noqa: ANN001, ANN003, ANN201
        self.jobs.append(job)


def test_a_dask_job_parses_its_sidecar_on_the_worker_only(daemon, counted: tuple[Counter, Counter]) -> None:
    """The loop takes the weights from the ticket; the worker parses the ticket's bytes, once."""
    from samwatch.executors.base import Dispatch
    from samwatch.executors.dask import DaskExecutor, _ResolvedWeights

    daemon, clock = daemon
    reads, parses = counted
    save_image(daemon.config.inbox / "d.png", SMALL)
    write_sidecar(daemon.config.inbox / "d.yaml", {"prompts": [{"bbox": [2, 3, 10, 12]}]})
    run_until_settled(daemon, clock)
    assert (reads["d.yaml"], parses["d.yaml"]) == (1, 1)  # discovery's

    client = _Client()
    DaskExecutor(daemon.config, daemon.registry, client=client).submit(Dispatch(ticket_of(daemon, "d"), "token"))
    (job,) = client.jobs
    assert parses["d.yaml"] == 1  # none on the loop
    pool = ModelPool(torch.device("cpu"), job.config.models, adapters=fake_adapters)
    outcome = JobRunner(job.config, _ResolvedWeights(job.spec), pool).run(
        job.ticket, Progress(JobOutputs(job.config.outbox, "d"), threading.Event()))
    assert outcome.state == "done" and (reads["d.yaml"], parses["d.yaml"]) == (1, 2)  # one on the worker
