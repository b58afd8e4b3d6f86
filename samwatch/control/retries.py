"""When a failed job runs again by itself.

Two kinds of failure can go away without anyone touching the job's files:

- **transient** ones (a download that failed, an I/O error on the share) run again after a
  bounded backoff: ``service.retry_base_seconds`` doubled per attempt, at most
  ``service.retry_attempts`` times for one version of the job;
- failures that depend on **what the daemon knows** (the weights registry, the config's limits)
  run again as soon as that changes: a config reload, or weights appearing on disk (fetched by
  ``samwatch weights fetch``, or by another daemon).

Anything else (a bad sidecar, an unreadable image) waits for its inputs to change, as before;
``samwatch retry`` runs any job again on request. The ledger is the truth: a failed row carries
its error code and how often its version was started, so the schedule survives a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from samwatch.control.claims import ClaimStore
from samwatch.config import Config
from samwatch.control.ledger import JobRow, Ledger
from samwatch.control.outbox import Outbox
from samwatch.control.retry_requests import take_retry_requests
from samwatch.vocab import JobTicket

#: failed jobs are looked over at most this often (a ledger query, a stat per weights file)
_LOOK_SECONDS = 1.0

#: failures that may pass by themselves: retried with backoff
TRANSIENT_CODES = frozenset({"weights_download_failed", "io_error"})

#: failures that a change of config or registry may cure: retried when that changes
CHANGE_CODES = frozenset({
    "unknown_weights", "checkpoint_url_refused", "weights_download_failed", "weights_download_cancelled",
    "weights_unavailable", "weights_checksum_mismatch", "weights_wrong_architecture", "weights_unsafe",
    "image_too_large", "video_too_large", "out_of_memory",
})

#: of those, the ones that weights appearing on disk cure
WEIGHTS_CODES = frozenset({"weights_download_failed", "weights_download_cancelled", "weights_unavailable"})


@dataclass
class RetrySchedule:
    """Backoff for transient failures; ``failed_at`` is the daemon's clock when first seen failed."""

    base_seconds: float
    max_attempts: int
    clock: Callable[[], float]
    _failed_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def delay(self, attempts: int) -> float | None:
        """Seconds to wait after the ``attempts``-th run failed; None: no more automatic retries."""
        if attempts > self.max_attempts:
            return None
        return self.base_seconds * 2 ** max(0, attempts - 1)

    def due(self, failed: Iterable[JobRow]) -> list[JobRow]:
        """The transiently failed rows whose backoff has passed."""
        now = self.clock()
        ready, seen = [], set()
        for row in failed:
            if row.error not in TRANSIENT_CODES:
                continue
            key = (row.job_id, row.version)
            seen.add(key)
            since = self._failed_at.setdefault(key, now)
            wait = self.delay(row.attempts)
            if wait is not None and now - since >= wait:
                ready.append(row)
                del self._failed_at[key]
        for key in set(self._failed_at) - seen:
            del self._failed_at[key]  # no longer failed (re-run, changed or gone)
        return ready

    def next_retry_in(self, row: JobRow) -> float | None:
        """Seconds until ``row`` runs again by itself (for its error message), None if never."""
        if row.error not in TRANSIENT_CODES:
            return None
        wait = self.delay(row.attempts)
        if wait is None:
            return None
        since = self._failed_at.get((row.job_id, row.version), self.clock())
        return max(0.0, since + wait - self.clock())


def cured_by_change(failed: Iterable[JobRow]) -> list[JobRow]:
    """Failed rows worth running again after the config or registry changed."""
    return [row for row in failed if row.error in CHANGE_CODES]


def cured_by_weights(failed: Iterable[JobRow]) -> list[JobRow]:
    """Failed rows worth running again if their weights are on disk now."""
    return [row for row in failed if row.error in WEIGHTS_CODES]


@dataclass
class Retrier:
    """Puts failed jobs back in the queue: after their backoff, when their weights appear, after a
    config change, or when ``samwatch retry`` asks. A job runs again as the same version."""

    config: Config
    ledger: Ledger
    claims: ClaimStore
    outbox: Outbox
    registry: Any
    clock: Callable[[], float]
    #: the row's ticket (queueing.py): its model type and weights, as discovery read them
    ticket_of: Callable[[JobRow], JobTicket | None]
    _next_look: float = float("-inf")

    def __post_init__(self) -> None:
        service = self.config.service
        self.schedule = RetrySchedule(service.retry_base_seconds, service.retry_attempts, self.clock)

    def step(self, now: float) -> None:
        if now < self._next_look:
            return
        self._next_look = now + _LOOK_SECONDS
        for request in take_retry_requests(self.outbox.state_folder):
            rows = [row for row in self.ledger.jobs_in(("failed", "done")) if request.matches(row)]
            for row in rows:
                self.requeue(row, "samwatch retry asked for it")
            if not rows:
                logger.info(f"retry request for {', '.join(request.paths) or 'failed jobs'}: no finished job matches")
        failed = self.ledger.jobs_in(("failed",))
        for row in self.schedule.due(failed):
            self.requeue(row, f"{row.error} may have passed (attempt {row.attempts + 1})")
        for row in cured_by_weights(failed):
            key = self._weights_of(row)
            if key is not None and self.registry.on_disk(*key):
                self.requeue(row, f"the {key[0]} weights {key[1]!r} are on disk now")

    def after_change(self, config: Config) -> None:
        """The config was reloaded: what failed or waits for lack of weights or limits tries again."""
        self.config = config
        self.schedule.base_seconds = config.service.retry_base_seconds
        self.schedule.max_attempts = config.service.retry_attempts
        for row in [*cured_by_change(self.ledger.jobs_in(("failed",))), *self.ledger.jobs_in(("waiting",))]:
            self.requeue(row, "the config changed")

    def requeue(self, row: JobRow, reason: str) -> None:
        if not self.ledger.set_state(row.job_id, "queued", version=row.version):
            return  # a newer version replaced it meanwhile: that one is queued already
        self.claims.reopen(row.job_id, row.version)
        self.outbox.queued(row.job_id, f"runs again: {reason}")
        logger.info(f"job {row.job_id} queued again: {reason}")

    def _weights_of(self, row: JobRow) -> tuple[str, str] | None:
        ticket = self.ticket_of(row)
        if ticket is None or ticket.model_type is None or ticket.weights_name is None:
            return None
        return ticket.model_type, ticket.weights_name
