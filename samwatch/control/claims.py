"""Claims on jobs, so several daemons sharing one inbox/outbox never run a job twice.

A claim is a file ``<outbox>/_samwatch/claims/<key>.<version>.lock`` created with O_EXCL (atomic
on local disks and on NFSv3+/SMB). Its owner touches it while the job runs; a claim not touched
for ``ttl`` seconds belongs to a dead daemon and is taken over by renaming it away first (only
one contender's rename succeeds). When the job ends, the owner leaves a ``.done`` marker naming
the outcome, so the other daemons record the job as finished without running it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from samwatch.atomic import atomic_write_json
from samwatch.processes import process_gone

#: a claim still unreadable this long after it was created was cut short (a full disk)
HALF_WRITTEN_SECONDS = 2.0


class ClaimStore:
    def __init__(self, folder: Path, instance: str, ttl: float, *, wallclock=time.time) -> None:
        self.folder = folder
        self.instance = f"{instance}:{os.getpid()}"
        self.ttl = ttl
        self._wallclock = wallclock
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _key(job_id: str) -> str:
        return hashlib.sha1(job_id.encode("utf-8")).hexdigest()[:20]

    def _lock(self, job_id: str, version: str) -> Path:
        return self.folder / f"{self._key(job_id)}.{version[:16]}.lock"

    def _done(self, job_id: str, version: str) -> Path:
        return self.folder / f"{self._key(job_id)}.{version[:16]}.done"

    def finished_elsewhere(self, job_id: str, version: str) -> str | None:
        """The outcome another daemon recorded for this version, if any."""
        try:
            return json.loads(self._done(job_id, version).read_text()).get("state")
        except (OSError, ValueError):
            return None

    def try_claim(self, job_id: str, version: str) -> bool:
        lock = self._lock(job_id, version)
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_stale(lock):
                    return False
                continue
            except FileNotFoundError:  # our folder was removed (rm -rf outbox): it comes back
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump({"owner": self.instance, "job": job_id, "claimed": self._wallclock()}, handle)
            except OSError:
                lock.unlink(missing_ok=True)  # if this fails too, the half-written claim is replaced later
                raise
            return True
        return False

    def _owner_is_dead(self, lock: Path) -> bool:
        """A claim of this instance by a process that no longer runs (we were restarted)."""
        try:
            owner = json.loads(lock.read_text()).get("owner", "")
        except (OSError, ValueError):
            return False
        instance, _, pid = owner.rpartition(":")
        if instance != self.instance.rpartition(":")[0] or not pid.isdigit() or int(pid) == os.getpid():
            return False
        return process_gone(int(pid))

    @staticmethod
    def _half_written(lock: Path, age: float) -> bool:
        """A claim left unreadable when the disk filled: its writer would have finished in microseconds."""
        if age < HALF_WRITTEN_SECONDS:
            return False
        try:
            json.loads(lock.read_text())
        except ValueError:
            return True
        except OSError:
            return False
        return False

    def _take_over_if_stale(self, lock: Path) -> bool:
        try:
            age = self._wallclock() - lock.stat().st_mtime
        except FileNotFoundError:
            return True
        if age < self.ttl and not self._owner_is_dead(lock) and not self._half_written(lock, age):
            return False
        try:
            os.rename(lock, lock.with_name(f"{lock.name}.stale-{secrets.token_hex(4)}"))
        except FileNotFoundError:
            return True  # someone else removed it; try to create ours
        for stale in self.folder.glob(f"{lock.name}.stale-*"):
            stale.unlink(missing_ok=True)
        return True

    def refresh(self, job_id: str, version: str) -> None:
        try:
            os.utime(self._lock(job_id, version))
        except OSError:  # gone or read-only: the next refresh tries again, the job goes on
            pass

    def reopen(self, job_id: str, version: str) -> None:
        """This version runs again (a retry): its recorded outcome no longer stands."""
        self._done(job_id, version).unlink(missing_ok=True)

    def release(self, job_id: str, version: str, state: str | None) -> None:
        """Drop the claim; with ``state``, first record the outcome for the other daemons."""
        if state is not None:
            for old in self.folder.glob(f"{self._key(job_id)}.*.done"):
                old.unlink(missing_ok=True)
            # Not fsync'd: the outcome itself is durable (result file, ledger); a marker lost to a
            # power cut only lets another daemon redo the same version, to the same files.
            atomic_write_json(self._done(job_id, version), {"state": state, "owner": self.instance}, durable=False)
        self._lock(job_id, version).unlink(missing_ok=True)
