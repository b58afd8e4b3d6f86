"""From settled files to queued job versions, and from the queue to the next job to run.

Discovery pairs sidecars and images; each job's *version* is the hash of its inputs, so a
changed file queues the job again and an unchanged one never does. What discovery found of a
version (its image or why there is none, its folder defaults, its sidecar's bytes, model and
weights) becomes its ``JobTicket``, so the job resolves nothing again; a queued row runs only
once discovery has seen its current version (after a restart, once its files settled). Picking
the next job respects claims, so several daemons on one share never run one version twice.
"""

from __future__ import annotations

import hashlib
import os

from loguru import logger

from samwatch.control.claims import ClaimStore
from samwatch.config import Config
from samwatch.control.discovery import (
    JobSource, find_jobs, folder_defaults, is_export, is_folder_defaults, nearest_defaults, split_name,
)
from samwatch.control.dispatch import Dispatcher, StopKind, StopRequest
from samwatch.errors import JobError
from samwatch.control.input_facts import InputFacts, SidecarFact
from samwatch.control.ledger import ACTIVE_STATES, JobRow, Ledger
from samwatch.control.outbox import Outbox
from samwatch.control.watcher import Watcher
from samwatch.sidecars.load import JobSidecar
from samwatch.vocab import JobTicket

#: how long a job claimed by another daemon, or not yet seen by discovery, is skipped before
#: it is looked at again (a backlog of thousands is not walked on every pass)
BUSY_ELSEWHERE_SECONDS = 2.0


class JobQueue:
    def __init__(
        self, config: Config, ledger: Ledger, watcher: Watcher, claims: ClaimStore, outbox: Outbox,
        dispatcher: Dispatcher, facts: InputFacts,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.watcher = watcher
        self.claims = claims
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.facts = facts
        self.known_jobs: dict[str, JobSource] = {}
        #: job -> its version last queued, as discovery found it: its ticket, and the sidecar parsed
        #: when its job does not fail with the sidecar's error
        self._tickets: dict[str, tuple[JobTicket, JobSidecar | None]] = {}
        self._defaults_by_folder: dict[str, str] = {}
        try:
            inner = config.outbox.resolve().relative_to(config.inbox.resolve()).as_posix()
        except ValueError:
            inner = None
        self._outbox_prefix = "" if inner == "." else inner
        self._skip_until: dict[str, float] = {}  # job -> when next_ready looks at it again

    # ---- discovery --------------------------------------------------------------------

    def discover(self, changed: set[str], vanished: set[str], arrived: set[str] = frozenset()) -> None:
        """Jobs whose inputs ``changed`` or ``vanished`` (watcher) or whose facts ``arrived``
        (InputFacts.drain) are queued in their current version."""
        with self.ledger.batch():  # one commit for a whole burst
            self._discover(changed, vanished, arrived)

    def _discover(self, changed: set[str], vanished: set[str], arrived: set[str]) -> None:
        settled = self.watcher.settled
        files = {rel for rel in set(settled) | self.watcher.pending if not self._in_outbox(rel)}
        # Before discovery reads any sidecar: facts that no longer hold go first.
        for path in changed | vanished:
            if path in vanished:
                self.facts.forget(path)
            if is_folder_defaults(path):  # what its sidecars inherit changed
                self.facts.forget_sidecars_under(split_name(path)[0])
        self._defaults_by_folder = folder_defaults(files)
        found = find_jobs(self.config.inbox, files, self._image_ref, self._annotations_ref, self.config.inputs.image_roots,
                          unreadable=self.watcher.skipped)
        jobs = {job.job_id: job for job in found}
        previous = self.known_jobs
        for job_id in set(previous) - set(jobs):
            self._forget(job_id)
        self.known_jobs = jobs
        touched = changed | vanished | arrived
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

    def _sidecar(self, rel: str) -> SidecarFact | None:
        """``rel`` as its job reads it: its own sidecar with its folder defaults, or a defaults file alone."""
        state = self.watcher.settled.get(rel)
        defaults = None if is_folder_defaults(rel) else nearest_defaults(split_name(rel)[0], self._defaults_by_folder)
        return None if state is None else self.facts.sidecar(rel, state, defaults)

    def _image_ref(self, rel: str) -> str | None:
        """The sidecar's ``image:`` key, if it can be read (errors surface when the job runs)."""
        fact = self._sidecar(rel)
        return fact.loaded.sidecar.image if fact is not None and fact.loaded is not None else None

    def _annotations_ref(self, rel: str) -> str | None:
        fact = self._sidecar(rel)
        annotations = fact.loaded.sidecar.annotations if fact is not None and fact.loaded is not None else None
        return annotations.file if annotations is not None else None

    def _in_outbox(self, rel: str) -> bool:
        """Files of an outbox inside the inbox are never inputs: each result (.geojson) beside
        its image would otherwise be a QuPath export to refine again, for ever."""
        prefix = self._outbox_prefix
        if prefix is None:
            return False
        return is_export(rel) if prefix == "" else rel.startswith(prefix + "/")

    def _enqueue(self, job: JobSource) -> None:
        """Queue ``job``'s current version; a job whose facts are still being worked out is
        looked at again when they arrive (the daemon passes them on as changed paths)."""
        sidecar = job.sidecar or job.defaults
        fact = self._sidecar(sidecar or "")

        def hash_of(path: str) -> str | None:
            # The sidecar's own hash is that of the bytes read with it: the bytes its job gets.
            if path == sidecar and not is_export(path) and (fact is None or fact.data is not None):
                return fact.sha256 if fact is not None else None
            return self.facts.hash(path, self.watcher.settled[path])

        hashes = [hash_of(path) for path in job.inputs]
        if fact is None or None in hashes:
            return
        if job.image and job.image not in job.inputs:  # under inputs.image_roots: never read whole to hash
            hashes.insert(0, _stored_identity(job.image))
        version = hashlib.sha256("\n".join([*job.inputs, *hashes]).encode()).hexdigest()
        group = job.job_id.split("/", 1)[0] if "/" in job.job_id else ""
        image_sha = hashes[0] if job.image else None  # the image comes first
        loaded = fact.loaded
        priority = loaded.priority if loaded is not None else self.config.defaults.priority
        ticket = JobTicket(
            job.job_id, sidecar, job.image, image_sha, version,
            sidecar_error=fact.error.to_dict() if fact.error is not None else None, image_error=job.image_error,
            defaults=job.defaults if job.sidecar else None, sidecar_bytes=fact.data,
            model_type=loaded.model_type if loaded is not None else None,
            weights_name=loaded.weights_name if loaded is not None else None,
        )
        self._tickets[job.job_id] = (ticket, loaded if fact.error is None else None)
        self._skip_until.pop(job.job_id, None)  # it may run as soon as its row says so
        if not self.ledger.upsert(
            job.job_id, sidecar=sidecar, image=job.image, image_sha=image_sha, version=version,
            priority=priority, grp=group,
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

    def ticket_of(self, row: JobRow) -> JobTicket | None:
        """The ticket of the row's version, as discovery found it; None while discovery has not."""
        found = self._found(row)
        return found[0] if found is not None else None

    def _found(self, row: JobRow) -> tuple[JobTicket, JobSidecar | None] | None:
        found = self._tickets.get(row.job_id)
        return found if found is not None and found[0].version == row.version else None

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: the model and weights a sidecar leaves to its defaults may be others
        now, so the jobs still to run are read again (each waits for that before it runs)."""
        self.config = config
        active = [job for job in self.known_jobs.values()
                  if (row := self.ledger.get(job.job_id)) is not None and row.state in ACTIVE_STATES]
        for job in active:
            self._tickets.pop(job.job_id, None)
            self.facts.forget(job.sidecar or job.defaults or "")
        self.discover(set(), set(), {job.sidecar or job.defaults or "" for job in active})

    def _forget(self, job_id: str) -> None:
        """Its sidecar (or image) is gone: a queued job is cancelled, a running one stopped."""
        self._tickets.pop(job_id, None)
        row = self.ledger.get(job_id)
        if row is None or row.state not in ACTIVE_STATES:
            return
        if self.dispatcher.stop(job_id, StopRequest(StopKind.CANCEL, "its sidecar was removed")):
            return
        self.ledger.set_state(job_id, "cancelled")
        self.outbox.cancelled(job_id, 0, "its sidecar or image was removed before it ran")
        logger.info(f"job {job_id} cancelled: inputs removed")

    def is_shared_image_busy(self, job_id: str, image: str | None) -> bool:
        """Whether another active job still needs ``image`` (inputs.after: move waits for it)."""
        return any(
            job.image == image and job.job_id != job_id
            and (row := self.ledger.get(job.job_id)) is not None and row.state in ACTIVE_STATES
            for job in self.known_jobs.values()
        )

    # ---- picking ------------------------------------------------------------------------

    def next_ready(self, now: float) -> tuple[JobRow, JobTicket, JobSidecar | None] | None:
        """The next job to run, claimed for this daemon, with its ticket and parsed sidecar
        (``Dispatch``); None when nothing is ready."""
        self._skip_until = {job: until for job, until in self._skip_until.items() if until > now}
        skipped = set(self._skip_until)
        while (row := self.ledger.next_job(exclude=frozenset(skipped))) is not None:
            found = self._found(row)
            if found is None:
                # A row from before a restart: once the inbox is seen settled without its files, it is gone.
                if row.job_id not in self.known_jobs and not self.watcher.pending and not self.facts.busy:
                    self._forget(row.job_id)
                self._skip_until[row.job_id] = now + BUSY_ELSEWHERE_SECONDS
                skipped.add(row.job_id)
                continue
            elsewhere = self.claims.finished_elsewhere(row.job_id, row.version)
            if elsewhere is not None:
                self.ledger.finish(row, elsewhere)
                # Our "queued" may have landed after the other daemon's final progress: restore it.
                self.outbox.restore_final(row.job_id, elsewhere, "finished by another daemon on this share")
                logger.info(f"job {row.job_id} finished by another daemon ({elsewhere})")
                continue
            try:
                claimed = self.claims.try_claim(row.job_id, row.version)
            except OSError as exc:  # the outbox refuses writes: try again after a while
                self.outbox.note_failure(exc)
                claimed = False
            if not claimed:
                self._skip_until[row.job_id] = now + BUSY_ELSEWHERE_SECONDS
                skipped.add(row.job_id)
                continue
            return row, *found
        return None


def _stored_identity(path: str) -> str:
    """A slide store's image by path, size and mtime: slides there are not rewritten, and hashing
    a 4 GiB scan per job would read it all again."""
    stat = os.stat(path)
    return hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
