"""The executor seam: what the daemon hands work to, and the messages that come back.

The daemon keeps watching, queueing, claiming, the ledger and every outbox write; an
executor only runs job versions. Everything crosses the seam as messages (a ``Dispatch``
in, ``ProgressReport`` and ``Finished`` out), never as shared objects, so the same daemon
drives a thread in this process or a worker on a cluster. Each dispatch carries a token the
ledger records: a ``Finished`` whose token the ledger no longer holds (a late result of a
run that was given up on) is dropped, which is what makes outcomes exactly-once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from samwatch import faults
from samwatch.config import Config
from samwatch.vocab import JobTicket, Outcome

if TYPE_CHECKING:
    from samwatch.sidecars.load import JobSidecar


@dataclass(frozen=True)
class Dispatch:
    ticket: JobTicket
    token: str  # unique per run: the ledger's record of which run may report the outcome
    #: the ticket's sidecar as discovery parsed it, for an executor in this process (a remote
    #: one parses the ticket's bytes where the job runs); None when its job fails with its error
    sidecar: JobSidecar | None = None


@dataclass(frozen=True)
class ProgressReport:
    job_id: str
    token: str
    stage: str
    percent: float
    message: str


@dataclass(frozen=True)
class Finished:
    job_id: str
    token: str
    outcome: Outcome
    worker: str  # which slot or cluster worker ran it


Event = ProgressReport | Finished


class Executor(Protocol):
    kind: str

    def free_slots(self) -> int:
        """How many more dispatches it takes now (the daemon never queues inside it)."""

    def submit(self, dispatch: Dispatch) -> None: ...

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Messages since the last poll; waits up to ``timeout`` for the first one."""

    def cancel(self, token: str) -> None:
        """Ask the run to stop: it ends soon with a ``cancelled`` outcome (or whatever it finished with)."""

    def workers(self) -> list[dict[str, Any]]:
        """One entry per slot or worker: name, host, device, memory, loaded models, job."""

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        """The config was reloaded: later runs use it; models of ``changed`` weights entries unload."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Place:
    """Where a unit of a job runs: that worker's model pool and its name."""

    pool: Any  # a models.pool.ModelPool
    worker: str


class UnitMapper(Protocol):
    """How a job spreads its units (tiles) over the executor's workers, handed to its ``JobRunner``.

    The local executor gives none (a slot owns its device: its job's tiles run there in turn);
    a Dask worker gives a mapper onto the cluster (executors/dask_units.py)."""

    def spreads(self, count: int) -> bool:
        """Whether ``count`` units are worth sending out (more than one worker thread can take them)."""

    def map_units(self, fn: Callable[[Any, Place], Any], units: Iterable[Any]) -> Iterator[Any]:
        """``fn(unit, place)`` for each unit, wherever a worker is free; results in the units' order,
        a bounded number in flight. Closing the iterator early cancels the units not yet run."""


def worker_identity(executor: str, name: str) -> dict[str, str]:
    """Who ran a job, for its result's provenance: this process's host, the slot or Dask worker
    name, and the batch job it runs in (Slurm sets ``SLURM_JOB_ID`` in a worker's job)."""
    identity = {"executor": executor, "name": name, "host": socket.gethostname()}
    if os.environ.get("SLURM_JOB_ID"):
        identity["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return identity


class ProgressChannel:
    """The ``ProgressSink`` a run reports into: each report becomes a message to the daemon."""

    def __init__(self, job_id: str, token: str, post: Callable[[ProgressReport], None]) -> None:
        self.job_id, self.token, self._post = job_id, token, post

    def running(self, stage: str, percent: float, message: str = "") -> None:
        faults.hit(stage, self.job_id)
        self._post(ProgressReport(self.job_id, self.token, stage, percent, message))
