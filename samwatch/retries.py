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

from samwatch.ledger import JobRow

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
