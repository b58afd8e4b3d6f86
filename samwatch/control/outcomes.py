"""Recording what became of each run: ledger, outbox files, claims, counters, moved inputs.

One place turns an ``Outcome`` into everything a person and the other daemons see, in one
order: the outbox files first (renamed into place and synced, or spooled), then the ledger,
then the claim's ``.done`` marker. A crash before the ledger's commit leaves the job
``running`` there, so the restart runs it again; after it, the files are in place. Jobs
waiting for weights are settled here too, when their download ends.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch import faults
from samwatch.control.claims import ClaimStore
from samwatch.config import Config
from samwatch.control.discovery import is_folder_defaults
from samwatch.control.dispatch import Running, StopKind
from samwatch.errors import JobError
from samwatch.control.ledger import JobRow, Ledger
from samwatch.atomic import now_iso
from samwatch.weights.files import read_json
from samwatch.control.outbox import LABELS_SUFFIX, PREVIEW_SUFFIX, Outbox
from samwatch.control.dashboard import RecentResults
from samwatch.control.queueing import JobQueue
from samwatch.vocab import WAITING_FOR_WEIGHTS, Outcome, stage_percent


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    keep_failures: int = 20
    #: job -> its latest failure, oldest first: a job that fails on every retry is listed once,
    #: and leaves the list when it succeeds
    failures: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    recent_results: RecentResults = field(default_factory=RecentResults)

    @property
    def recent_failures(self) -> list[dict[str, Any]]:
        return list(self.failures.values())

    def success(self, job_id: str, outcome: Outcome) -> None:
        self.done += 1
        self.failures.pop(job_id, None)
        self.recent_results.add(job_id, features=outcome.features, seconds=outcome.seconds,
                                preview=PREVIEW_SUFFIX in outcome.extras, labels=LABELS_SUFFIX in outcome.extras)

    def failure(self, job_id: str, error: JobError) -> None:
        self.failed += 1
        self.note_failure(job_id, error.code, error.message, now_iso())
        self.recent_results.discard(job_id)  # its result file is gone

    def note_failure(self, job_id: str, code: str, message: str, at: str) -> None:
        self.failures.pop(job_id, None)
        self.failures[job_id] = {"job": job_id, "error": code, "message": message, "at": at}
        while len(self.failures) > self.keep_failures:
            self.failures.popitem(last=False)


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
        self.stats = RunStats(keep_failures=config.service.recent_failures)
        self.waiting_on: dict[str, tuple[str, str] | None] = {}
        self._restore_history()

    def _restore_history(self) -> None:
        """Failures and results of earlier runs, from the ledger and the outbox: a restart must
        not blank ``samwatch status`` and the dashboard."""
        def at(updated: float) -> str:
            return datetime.fromtimestamp(updated, timezone.utc).isoformat(timespec="milliseconds")

        for job_id, code, updated in reversed(self.ledger.latest("failed", self.stats.keep_failures)):
            body = read_json(self.outbox.root / f"{job_id}.error.json")
            message = body.get("message") if isinstance(body.get("message"), str) else ""
            self.stats.note_failure(job_id, code or str(body.get("error", "")), message, at(updated))
        for job_id, _, updated in reversed(self.ledger.latest("done", self.stats.recent_results.keep)):
            has = {suffix: (self.outbox.root / f"{job_id}{suffix}").is_file() for suffix in (PREVIEW_SUFFIX, LABELS_SUFFIX)}
            self.stats.recent_results.add(job_id, features=None, seconds=None, at=at(updated),
                                          preview=has[PREVIEW_SUFFIX], labels=has[LABELS_SUFFIX])

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
        if outcome.state == "done":
            durable = self.outbox.done(ticket.job_id, outcome.result, f"{outcome.features} features", outcome.extras)
            self._commit(row, "done", None, durable)
            self.stats.success(ticket.job_id, outcome)
            logger.info(outcome.summary)
        else:
            assert error is not None
            durable = self.outbox.failed(ticket.job_id, self._error_body(error, row), run.percent, error.message)
            self._commit(row, outcome.state, error, durable)
            self.stats.failure(ticket.job_id, error)
            logger.warning(f"job {ticket.job_id} failed error={error.code} seconds={outcome.seconds:.2f}: {error.message}")
        if self.config.inputs.after == "move":
            try:
                self._move_inputs(row, outcome.state == "done")
            except OSError as exc:  # the inbox is someone's share too: the outcome stands
                logger.warning(f"job {ticket.job_id}: inputs not moved ({exc})")

    def _commit(self, row: JobRow, state: str, error: JobError | None, durable: bool) -> None:
        """The outcome, its files durable (or held in memory only: not ``durable``), into the ledger."""
        faults.hit("renamed", row.job_id)
        self.ledger.finish(row, state, error=error.code if error else None, unwritten=not durable)
        faults.hit("recorded", row.job_id)
        # Only a written outcome is announced to the other daemons: they would take it as theirs to show.
        self._release(row, state if durable else None)

    def note_landed(self) -> None:
        """Outcomes the outbox held in memory are written now: nothing to redo after a restart."""
        for job_id in self.outbox.take_landed():
            self.ledger.written(job_id)

    def recover_unwritten(self) -> None:
        """At start: an outcome recorded while the outbox and the spool refused its files, and
        not in place now, was lost with the process that held it: the job runs again."""
        for row in self.ledger.unwritten_jobs():
            if self.outbox.job(row.job_id).shows(row.state):
                self.ledger.written(row.job_id)
                continue
            self.ledger.set_state(row.job_id, "queued", version=row.version)
            self.claims.reopen(row.job_id, row.version)
            self.outbox.queued(row.job_id, "its outcome could not be written before samwatch stopped; it runs again")
            logger.warning(f"job {row.job_id}: its {row.state} outcome was never written (the outbox was full); it runs again")

    def _release(self, row: JobRow, state: str | None) -> None:
        """Drop the claim (with ``state``, leave the outcome marker), retried if the outbox refuses."""
        self.outbox.attempt(f"claim:{row.job_id}", partial(self.claims.release, row.job_id, row.version, state))

    @staticmethod
    def _error_body(error: JobError, row: JobRow) -> dict[str, Any]:
        return {**error.to_dict(), "job": row.job_id, "sidecar": row.sidecar, "image": row.image}

    def _move_inputs(self, row: JobRow, success: bool) -> None:
        paths = [p for p in (row.sidecar,) if p and not is_folder_defaults(p)]
        # An image under inputs.image_roots (absolute) is never moved: those folders are read-only.
        if row.image and not Path(row.image).is_absolute() and not self.queue.is_shared_image_busy(row.job_id, row.image):
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
                durable = self.outbox.failed(job_id, self._error_body(error, row), self._download_percent(state), error.message)
                self.ledger.finish(row, "failed", error=error.code, unwritten=not durable)
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
