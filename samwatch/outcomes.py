"""Recording what became of each run: ledger, outbox files, claims, counters, moved inputs.

One place turns an ``Outcome`` into everything a person and the other daemons see, in one
order: the ledger first (the truth), then the outbox files, then the claim's ``.done``
marker. Jobs waiting for weights are settled here too, when their download ends.
"""

from __future__ import annotations

import shutil
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch.claims import ClaimStore
from samwatch.config import Config
from samwatch.discovery import is_folder_defaults
from samwatch.dispatch import Running, StopKind
from samwatch.errors import JobError
from samwatch.ledger import JobRow, Ledger
from samwatch.atomic import now_iso
from samwatch.outbox import LABELS_SUFFIX, PREVIEW_SUFFIX, Outbox
from samwatch.outputs.dashboard import RecentResults
from samwatch.queueing import JobQueue
from samwatch.vocab import WAITING_FOR_WEIGHTS, Outcome, stage_percent


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    recent_failures: deque = field(default_factory=lambda: deque(maxlen=20))
    recent_results: RecentResults = field(default_factory=RecentResults)

    def success(self, job_id: str, outcome: Outcome) -> None:
        self.done += 1
        self.recent_results.add(job_id, features=outcome.features, seconds=outcome.seconds,
                                preview=PREVIEW_SUFFIX in outcome.extras, labels=LABELS_SUFFIX in outcome.extras)

    def failure(self, job_id: str, error: JobError) -> None:
        self.failed += 1
        self.recent_failures.append({"job": job_id, "error": error.code, "message": error.message, "at": now_iso()})
        self.recent_results.discard(job_id)  # its result file is gone


class OutcomeRecorder:
    def __init__(
        self, config: Config, ledger: Ledger, claims: ClaimStore, outbox: Outbox, registry: Any, queue: JobQueue,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.claims = claims
        self.outbox = outbox
        self.registry = registry
        self.queue = queue
        self.stats = RunStats(recent_failures=deque(maxlen=config.service.recent_failures or 1))
        self.waiting_on: dict[str, tuple[str, str] | None] = {}

    def record(self, run: Running, outcome: Outcome, *, stopping: bool) -> None:
        ticket, row = run.ticket, run.row
        if outcome.state == "waiting":
            self.ledger.set_state(ticket.job_id, "waiting", version=ticket.version)
            self._release(row, None)
            self.waiting_on[ticket.job_id] = outcome.waiting_for
            self._report_download(ticket.job_id, outcome.waiting_for)
            return
        if outcome.state == "cancelled":
            stop = run.stop
            if stopping or stop is None or stop.kind is StopKind.REQUEUE:
                reason = stop.reason if stop is not None else "the daemon is stopping"
                self.ledger.finish(row, "queued")
                self._release(row, None)
                self.outbox.queued(ticket.job_id, f"interrupted ({reason}); it runs again")
                logger.info(f"job {ticket.job_id} interrupted: {reason}")
                return
            self.ledger.finish(row, "cancelled")
            self.outbox.cancelled(ticket.job_id, run.percent, f"The job was cancelled: {stop.reason}.")
            self._release(row, None)
            self.stats.cancelled += 1
            logger.info(f"job {ticket.job_id} cancelled: {stop.reason}")
            return
        error = outcome.error
        self.ledger.finish(row, outcome.state, error=error.code if error else None)
        if outcome.state == "done":
            self.outbox.done(ticket.job_id, outcome.result, f"{outcome.features} features", outcome.extras)
            self.stats.success(ticket.job_id, outcome)
            logger.info(outcome.summary)
        else:
            assert error is not None
            self.outbox.failed(ticket.job_id, self._error_body(error, row), run.percent, error.message)
            self.stats.failure(ticket.job_id, error)
            logger.warning(f"job {ticket.job_id} failed error={error.code} seconds={outcome.seconds:.2f}: {error.message}")
        self._release(row, outcome.state)
        if self.config.inputs.after == "move":
            try:
                self._move_inputs(row, outcome.state == "done")
            except OSError as exc:  # the inbox is someone's share too: the outcome stands
                logger.warning(f"job {ticket.job_id}: inputs not moved ({exc})")

    def _release(self, row: JobRow, state: str | None) -> None:
        """Drop the claim (with ``state``, leave the outcome marker), retried if the outbox refuses."""
        self.outbox.attempt(f"claim:{row.job_id}", partial(self.claims.release, row.job_id, row.version, state))

    @staticmethod
    def _error_body(error: JobError, row: JobRow) -> dict[str, Any]:
        return {**error.to_dict(), "job": row.job_id, "sidecar": row.sidecar, "image": row.image}

    def _move_inputs(self, row: JobRow, success: bool) -> None:
        paths = [p for p in (row.sidecar,) if p and not is_folder_defaults(p)]
        if row.image and not self.queue.is_shared_image_busy(row.job_id, row.image):
            paths.append(row.image)
        move_inputs(self.config.inbox, paths, success)

    # ---- weights downloads ------------------------------------------------------------

    def check_waiting(self) -> None:
        """Jobs waiting for weights: queued again when they are ready, failed when the fetch failed."""
        for job_id, key in list(self.waiting_on.items()):
            row = self.ledger.get(job_id)
            if row is None or row.state != "waiting" or key is None:
                self.waiting_on.pop(job_id, None)
                continue
            state = self.registry.request(*key)
            error = getattr(state, "error", None)
            if error is not None:
                self.waiting_on.pop(job_id)
                self.ledger.finish(row, "failed", error=error.code)
                self.outbox.failed(job_id, self._error_body(error, row), self._download_percent(state), error.message)
                self.stats.failure(job_id, error)
                logger.warning(f"job {job_id} failed error={error.code}: {error.message}")
            elif not hasattr(state, "state"):  # a LoadSpec: the weights are here
                self.waiting_on.pop(job_id)
                self.ledger.set_state(job_id, "queued", version=row.version)
            else:
                self._report_download(job_id, key, state)

    def _report_download(self, job_id: str, key: tuple[str, str] | None, state: Any = None) -> None:
        if key is None:
            return
        if state is None:
            state = self.registry.request(*key)
        percent = getattr(state, "percent", 0) or 0
        self.outbox.waiting(
            job_id, WAITING_FOR_WEIGHTS, self._download_percent(state), f"downloading weights {key[1]} for {key[0]}: {percent:.0f}%"
        )

    @staticmethod
    def _download_percent(state: Any) -> float:
        return stage_percent(WAITING_FOR_WEIGHTS, (getattr(state, "percent", 0) or 0) / 100)


def move_inputs(inbox: Path, paths: list[str], success: bool) -> None:
    """inputs.after: move — to inbox/_done/ or inbox/_failed/, keeping the relative path."""
    target_root = inbox / ("_done" if success else "_failed")
    for rel in paths:
        source = inbox / rel
        if not source.exists():
            continue
        target = target_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
