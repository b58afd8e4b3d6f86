"""The jobs in flight: handing ledger rows to the executor, their progress, stopping them.

Every run gets a token the ledger records (``Ledger.start``); the outcome of a run whose
token the ledger no longer holds is dropped, so each job version has exactly one outcome even
when a cluster delivers a result late or twice. Stopping a run is an explicit kind: requeue
(the job runs again: its inputs changed, the daemon stops) or cancel (it was withdrawn).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from loguru import logger

from samwatch import faults
from samwatch.control.claims import ClaimStore
from samwatch.executors.base import Dispatch, Executor, Finished, ProgressReport
from samwatch.control.ledger import JobRow, Ledger
from samwatch.control.outbox import Outbox
from samwatch.sidecars.load import JobSidecar
from samwatch.vocab import JobTicket


class StopKind(Enum):
    REQUEUE = "requeue"  # interrupted, not refused: it runs again (as its new version, or after restart)
    CANCEL = "cancel"  # withdrawn (its sidecar or image was removed): it ends cancelled


@dataclass(frozen=True)
class StopRequest:
    kind: StopKind
    reason: str


@dataclass
class Running:
    ticket: JobTicket
    row: JobRow
    token: str
    started: float
    stage: str = "reading"
    percent: float = 0.0
    last_change: float = 0.0
    stop: StopRequest | None = None


class Dispatcher:
    def __init__(
        self, executor: Executor, ledger: Ledger, claims: ClaimStore, outbox: Outbox, clock: Callable[[], float],
    ) -> None:
        self.executor = executor
        self.ledger = ledger
        self.claims = claims
        self.outbox = outbox
        self.clock = clock
        self.running: dict[str, Running] = {}  # token -> run

    def free_slots(self) -> int:
        return self.executor.free_slots()

    def by_job(self, job_id: str) -> Running | None:
        return next((run for run in self.running.values() if run.ticket.job_id == job_id), None)

    def start(self, row: JobRow, ticket: JobTicket, sidecar: JobSidecar | None = None) -> Running:
        """Hand ``row`` to the executor as ``ticket`` (``sidecar``: its parse, see ``Dispatch``)."""
        token = secrets.token_hex(8)
        now = self.clock()
        run = Running(ticket, row, token, now, last_change=now)
        faults.hit("queued", row.job_id)
        self.ledger.start(row, token)
        self.outbox.running(row.job_id, "reading", 0, "started")
        self.running[token] = run
        logger.info(f"job {row.job_id} started")
        self.executor.submit(Dispatch(ticket, token, sidecar))
        return run

    def stop(self, job_id: str, request: StopRequest) -> bool:
        run = self.by_job(job_id)
        if run is None:
            return False
        # A cancel never downgrades a requeue already asked for (its new version must run).
        if run.stop is None or run.stop.kind is StopKind.CANCEL:
            run.stop = request
        self.executor.cancel(run.token)
        return True

    def stop_all(self, request: StopRequest) -> None:
        for run in list(self.running.values()):
            self.stop(run.ticket.job_id, request)

    def on_progress(self, report: ProgressReport) -> None:
        run = self.running.get(report.token)
        if run is None:
            return  # a run already finished or given up on
        run.stage, run.percent, run.last_change = report.stage, report.percent, self.clock()
        self.outbox.running(report.job_id, report.stage, report.percent, report.message)

    def take(self, finished: Finished) -> Running | None:
        """The run this outcome belongs to, if the ledger still waits for it; else None (dropped)."""
        run = self.running.pop(finished.token, None)
        if run is None or not self.ledger.holds(finished.job_id, finished.token):
            logger.warning(f"job {finished.job_id}: dropped a late outcome of an abandoned run ({finished.outcome.state})")
            return None
        return run

    def refresh_claims(self) -> None:
        for run in self.running.values():
            self.claims.refresh(run.ticket.job_id, run.ticket.version)

