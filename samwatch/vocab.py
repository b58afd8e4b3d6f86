"""The job vocabulary both sides speak: what the daemon hands a job, what comes back, and how
its progress is told. Torch-free and codec-free on purpose: the control side (the daemon's
loop, ``samwatch status``) imports this, never the job side.

``Outcome.to_wire``/``from_wire`` is the one form an outcome crosses a process or machine
boundary in (local executor queue, Dask future): a plain dict of JSON- and pickle-safe values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from samwatch.errors import JobCancelled, JobError

#: The stage of a job read ahead while the one before it holds the device (pipeline.py).
WAITING_FOR_DEVICE = "waiting for the device"
#: The stage of a job whose weights are still being fetched (outcomes.py reports it).
WAITING_FOR_WEIGHTS = "waiting for weights"

#: stage -> the span of the overall percent it covers
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "reading": (0, 5),
    WAITING_FOR_WEIGHTS: (5, 10),
    WAITING_FOR_DEVICE: (5, 10),
    "loading model": (10, 20),
    "encoding image": (20, 40),
    "decoding prompts": (40, 95),
    "automask": (20, 95),
    "tracking": (20, 95),
    "frames": (20, 95),
    "tiles": (20, 95),
    "writing": (95, 100),
}


def stage_percent(stage: str, fraction: float) -> float:
    low, high = STAGE_SPANS[stage]
    return low + (high - low) * max(0.0, min(1.0, fraction))


@dataclass(frozen=True)
class JobTicket:
    """What the daemon hands the worker: one job version, with what discovery found of it, so
    the job resolves nothing again (queueing.py builds it; executors pickle it to workers)."""

    job_id: str
    sidecar: str | None  # own sidecar, or the folder defaults file for defaults-only jobs
    image: str | None
    image_sha: str | None
    version: str
    #: the error (``JobError.to_dict``) the job fails with: its sidecar's, and why it has no image
    sidecar_error: dict[str, Any] | None = None
    image_error: dict[str, Any] | None = None
    defaults: str | None = None  # the folder defaults file merged into its own sidecar
    #: the sidecar's bytes the version was computed from; None: read from disk (a QuPath export)
    sidecar_bytes: bytes | None = None
    model_type: str | None = None  # what the sidecar asks for, with the config's defaults
    weights_name: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    """What a model adapter's ``setup`` loads: a verified local checkpoint for one model type
    (the weights registry's answer, shipped with a Dask job)."""

    model_type: str
    checkpoint: Path
    weights_name: str
    sha256: str | None = None
    config: str | None = None  # family-specific (SAM2 Hydra config)
    source: str = ""  # URL or path, for messages


@dataclass
class Outcome:
    state: str  # done | failed | cancelled | waiting
    error: JobError | None = None
    features: int = 0
    waiting_for: tuple[str, str] | None = None
    seconds: float = 0.0
    summary: str = ""
    #: the GeoJSON FeatureCollection of a done job: the daemon writes it, after checking
    #: that this run is still the one the ledger expects (a late duplicate is dropped); the
    #: local executor hands it over encoded (an ``orjson.Fragment``, atomic.py ``encoded_now``)
    result: Any = None
    #: files written with the result (outbox suffix -> bytes): preview, label image, table
    extras: dict[str, bytes] = field(default_factory=dict)
    #: who ran it (executors/base.py ``worker_identity``: executor, name, host, slurm_job), as in
    #: the result's provenance; None for an outcome the daemon decided without running the job
    worker: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        """This outcome as plain values (the result stays as it is: a dict or encoded bytes)."""
        return {
            "state": self.state, "error": self.error.to_dict() if self.error else None,
            "features": self.features, "waiting_for": list(self.waiting_for) if self.waiting_for else None,
            "seconds": self.seconds, "summary": self.summary, "result": self.result, "extras": dict(self.extras),
            "worker": dict(self.worker) if self.worker else None,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Outcome:
        waiting_for = body.get("waiting_for")
        return cls(
            body["state"], error=error_from_wire(body.get("error")), features=body.get("features", 0),
            waiting_for=(waiting_for[0], waiting_for[1]) if waiting_for else None,
            seconds=body.get("seconds", 0.0), summary=body.get("summary", ""), result=body.get("result"),
            extras=dict(body.get("extras") or {}), worker=body.get("worker"),
        )


def error_from_wire(body: dict[str, Any] | None) -> JobError | None:
    """The ``JobError`` of ``JobError.to_dict`` (a cancellation stays a ``JobCancelled``)."""
    if body is None:
        return None
    details = dict(body)
    code, message = details.pop("error"), details.pop("message")
    if code == "cancelled":
        return JobCancelled(message)
    return JobError(code, message, field=details.pop("field", None), file=details.pop("file", None), **details)


class ProgressSink(Protocol):
    def running(self, stage: str, percent: float, message: str = "") -> None: ...


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Progress:
    """The running job's progress, reported to ``sink`` (throttled); checks the cancel flag.

    The sink is a message channel back to the daemon (an executor's queue) or, in tests, a
    job's ``JobOutputs``; the flag is a ``threading.Event`` or a cluster-wide one.
    """

    sink: ProgressSink
    cancel: CancelFlag
    clock: Callable[[], float] = time.monotonic
    min_interval: float = 0.5
    stage: str = "reading"
    percent: float = 0.0
    last_change: float = field(default=0.0)
    _last_write: float = field(default=float("-inf"))

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if self.cancel.is_set():
            raise JobCancelled("The job was cancelled: its sidecar was removed or the daemon is stopping.")
        percent = stage_percent(stage if stage in STAGE_SPANS else "automask", fraction)
        now = self.clock()
        self.last_change = now
        if stage != self.stage or now - self._last_write >= self.min_interval or fraction >= 1.0:
            self.sink.running(stage, percent, message)
            self._last_write = now
        self.stage, self.percent = stage, percent
