"""From settled files to queued job versions, and from the queue to the next job to run.

Discovery pairs sidecars and images; each job's *version* is the hash of its inputs, so a
changed file queues the job again and an unchanged one never does. Picking the next job
respects claims, so several daemons on one share never run one version twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

from loguru import logger

from samwatch.claims import ClaimStore
from samwatch.config import Config
from samwatch.discovery import JobSource, find_jobs
from samwatch.dispatch import Dispatcher, StopKind, StopRequest
from samwatch.errors import JobError
from samwatch.job_sidecar import load_job_sidecar
from samwatch.ledger import ACTIVE_STATES, JobRow, Ledger
from samwatch.media import content_hash
from samwatch.outbox import Outbox
from samwatch.watcher import Watcher

#: how long a job claimed by another daemon is skipped before its claim is looked at again
BUSY_ELSEWHERE_SECONDS = 2.0


class JobQueue:
    def __init__(
        self, config: Config, ledger: Ledger, watcher: Watcher, claims: ClaimStore, outbox: Outbox,
        dispatcher: Dispatcher,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.watcher = watcher
        self.claims = claims
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.known_jobs: dict[str, JobSource] = {}
        self._image_refs: dict[str, tuple[Any, str | None]] = {}  # sidecar -> (file state, image key)
        self._busy_elsewhere: dict[str, float] = {}

    # ---- discovery --------------------------------------------------------------------

    def discover(self, changed: set[str], vanished: set[str]) -> None:
        settled = self.watcher.settled
        files = set(settled) | self.watcher.pending
        jobs = {job.job_id: job for job in find_jobs(self.config.inbox, files, self._image_ref)}
        previous = self.known_jobs
        for job_id in set(previous) - set(jobs):
            self._forget(previous[job_id])
        self.known_jobs = jobs
        touched = changed | vanished
        for path in vanished:
            self._image_refs.pop(path, None)
        for job in list(jobs.values()):
            if job.job_id in previous and previous[job.job_id] == job and not (set(job.inputs) & touched):
                continue  # nothing it depends on changed
            if any(path not in settled for path in job.inputs):
                continue  # something it needs is still being written
            try:
                self._enqueue(job)
            except (OSError, JobError) as exc:  # vanished or unreadable since the scan
                logger.warning(f"job {job.job_id} not queued yet: {exc}")
                self.known_jobs.pop(job.job_id, None)

    def _image_ref(self, rel: str) -> str | None:
        """The sidecar's ``image:`` key, if it can be read (errors surface when the job runs)."""
        state = self.watcher.settled.get(rel)
        cached = self._image_refs.get(rel)
        if cached is not None and cached[0] == state:
            return cached[1]
        try:
            ref = load_job_sidecar(self.config, rel, problems=[]).sidecar.image
        except (OSError, JobError):
            ref = None
        self._image_refs[rel] = (state, ref)
        return ref

    def _hash(self, rel: str) -> str:
        stamp = asdict(self.watcher.settled[rel])
        cached = self.ledger.cached_hash(rel, **stamp)
        if cached is None:
            cached = content_hash(self.config.inbox / rel)
            self.ledger.store_hash(rel, cached, **stamp)
        return cached

    def _enqueue(self, job: JobSource) -> None:
        hashes = [self._hash(path) for path in job.inputs]
        version = hashlib.sha256("\n".join([*job.inputs, *hashes]).encode()).hexdigest()
        sidecar = job.sidecar or job.defaults
        group = job.job_id.split("/", 1)[0] if "/" in job.job_id else ""
        image_sha = self._hash(job.image) if job.image else None
        if not self.ledger.upsert(
            job.job_id, sidecar=sidecar, image=job.image, image_sha=image_sha, version=version,
            priority=self._priority(job), grp=group,
        ):
            return
        elsewhere = self.claims.finished_elsewhere(job.job_id, version)
        if elsewhere is not None:  # another daemon on this share did it: its outputs stand
            self.ledger.set_state(job.job_id, elsewhere, version=version)
            return
        logger.info(f"job {job.job_id} queued version={version[:12]}")
        interrupted = self.dispatcher.stop(
            job.job_id, StopRequest(StopKind.REQUEUE, "its inputs changed; the new version runs next")
        )
        if not interrupted:
            self.outbox.queued(job.job_id)

    def _priority(self, job: JobSource) -> int:
        """The sidecar's priority, else its folder defaults', else the config's."""
        try:
            return load_job_sidecar(self.config, job.sidecar or job.defaults or "", problems=[]).priority
        except (OSError, JobError):
            return self.config.defaults.priority

    def _forget(self, job: JobSource) -> None:
        """Its sidecar (or image) is gone: a queued job is cancelled, a running one stopped."""
        row = self.ledger.get(job.job_id)
        if row is None or row.state not in ACTIVE_STATES:
            return
        if self.dispatcher.stop(job.job_id, StopRequest(StopKind.CANCEL, "its sidecar was removed")):
            return
        self.ledger.set_state(job.job_id, "cancelled")
        self.outbox.cancelled(job.job_id, 0, "its sidecar or image was removed before it ran")
        logger.info(f"job {job.job_id} cancelled: inputs removed")

    def is_shared_image_busy(self, job_id: str, image: str | None) -> bool:
        """Whether another active job still needs ``image`` (inputs.after: move waits for it)."""
        return any(
            job.image == image and job.job_id != job_id
            and (row := self.ledger.get(job.job_id)) is not None and row.state in ACTIVE_STATES
            for job in self.known_jobs.values()
        )

    # ---- picking ------------------------------------------------------------------------

    def next_ready(self, now: float) -> JobRow | None:
        """The next job to run, claimed for this daemon; None when nothing is ready."""
        self._busy_elsewhere = {job: until for job, until in self._busy_elsewhere.items() if until > now}
        skipped = set(self._busy_elsewhere)
        while (row := self.ledger.next_job(exclude=frozenset(skipped))) is not None:
            elsewhere = self.claims.finished_elsewhere(row.job_id, row.version)
            if elsewhere is not None:
                self.ledger.finish(row, elsewhere)
                # Our "queued" may have landed after the other daemon's final progress: restore it.
                self.outbox.restore_final(row.job_id, elsewhere, "finished by another daemon on this share")
                logger.info(f"job {row.job_id} finished by another daemon ({elsewhere})")
                continue
            if not self.claims.try_claim(row.job_id, row.version):
                self._busy_elsewhere[row.job_id] = now + BUSY_ELSEWHERE_SECONDS
                skipped.add(row.job_id)
                continue
            return row
        return None
