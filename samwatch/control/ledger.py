"""The job ledger: which job versions exist, their state, and the file-hash cache.

SQLite in WAL mode under ``state_dir`` so a restart knows what is finished (not redone) and
what is not (redone): a job is identified by its output stem and a *version*, the hash of
the contents it was made from. Only the daemon's main thread uses the connection.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,   -- output stem, e.g. exp1/img001.cells
    sidecar     TEXT,               -- relative path of the sidecar or folder defaults
    image       TEXT,               -- relative path of the image (NULL: not found)
    image_sha   TEXT,               -- sha256 of the image's bytes (embedding cache key)
    version     TEXT NOT NULL,      -- hash of image + sidecar (+ folder defaults) contents
    state       TEXT NOT NULL,      -- queued | waiting | running | done | failed | cancelled
    priority    INTEGER NOT NULL DEFAULT 0,
    grp         TEXT NOT NULL DEFAULT '',  -- fairness group: the top-level folder
    seen        REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    updated     REAL NOT NULL,
    token       TEXT,               -- the run now allowed to report this job's outcome
    unwritten   INTEGER NOT NULL DEFAULT 0  -- 1: its outcome files are held in memory only
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS groups (grp TEXT PRIMARY KEY, served REAL NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    ctime_ns INTEGER NOT NULL DEFAULT 0, inode INTEGER NOT NULL DEFAULT 0
);
"""
#: A cached hash stands only while all of these are unchanged. Size and mtime alone can be
#: faked (``cp -p``, ``rsync -t``, ``os.utime`` set mtime back); the inode (a replaced file)
#: and ctime (any write or utime) cannot be set by a writer.
_HASH_STAMP = ("size", "mtime_ns", "ctime_ns", "inode")

ACTIVE_STATES = ("queued", "waiting", "running")


@dataclass(frozen=True)
class JobRow:
    job_id: str
    sidecar: str | None
    image: str | None
    image_sha: str | None
    version: str
    state: str
    priority: int
    grp: str
    attempts: int
    error: str | None


class LedgerUnreadable(Exception):
    """The ledger file is damaged or not a database: the daemon cannot start on it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"the ledger {path} cannot be read ({reason}). Move it aside (mv '{path}' '{path}.broken') and "
            "start samwatch again: it makes a new ledger, and the outbox is the record of finished work "
            "(results and _samwatch/claims), so finished jobs are not redone."
        )


class Ledger:
    def __init__(self, path: Path, *, wallclock=time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except sqlite3.OperationalError:
            raise  # locked, read-only, out of space: not the file's fault
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            self._db.close()
            raise LedgerUnreadable(path, str(exc)) from None
        self._wallclock = wallclock

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a job reported done survives a power cut, as the result file does.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "token" not in columns:  # a ledger from before dispatch tokens
            self._db.execute("ALTER TABLE jobs ADD COLUMN token TEXT")
        if "unwritten" not in columns:  # a ledger from before outcomes were recorded after their files
            self._db.execute("ALTER TABLE jobs ADD COLUMN unwritten INTEGER NOT NULL DEFAULT 0")
        hash_columns = {row[1] for row in self._db.execute("PRAGMA table_info(file_hashes)")}
        for column in ("ctime_ns", "inode"):
            if column not in hash_columns:  # a ledger from before; its rows then never match: re-hashed once
                self._db.execute(f"ALTER TABLE file_hashes ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes, one commit: a burst of discovered jobs costs one sync to disk, not one each."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- jobs -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        row = self._db.execute(
            "SELECT job_id, sidecar, image, image_sha, version, state, priority, grp, attempts, error "
            "FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        return JobRow(*row) if row else None

    def upsert(
        self,
        job_id: str,
        *,
        sidecar: str | None,
        image: str | None,
        image_sha: str | None,
        version: str,
        priority: int,
        grp: str,
    ) -> bool:
        """Record the job's current version; True when it needs (re)running."""
        now = self._wallclock()
        current = self.get(job_id)
        if current is not None and current.version == version and current.state != "cancelled":
            if current.priority != priority:
                self._db.execute("UPDATE jobs SET priority = ? WHERE job_id = ?", (priority, job_id))
            return False
        self._db.execute(
            "INSERT INTO jobs (job_id, sidecar, image, image_sha, version, state, priority, grp, seen, updated) "
            "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?) "
            "ON CONFLICT(job_id) DO UPDATE SET sidecar = excluded.sidecar, image = excluded.image, "
            "image_sha = excluded.image_sha, "
            "version = excluded.version, priority = excluded.priority, grp = excluded.grp, "
            "state = CASE WHEN jobs.state = 'running' THEN 'running' ELSE 'queued' END, "
            "seen = excluded.seen, attempts = 0, error = NULL, updated = excluded.updated",
            (job_id, sidecar, image, image_sha, version, priority, grp, now, now),
        )
        return True

    def set_state(
        self, job_id: str, state: str, *, version: str | None = None, error: str | None = None, unwritten: bool = False,
    ) -> bool:
        """Move a job to ``state``; with ``version``, only if that is still its version."""
        query = "UPDATE jobs SET state = ?, error = ?, token = NULL, unwritten = ?, updated = ? WHERE job_id = ?"
        params: tuple = (state, error, int(unwritten), self._wallclock(), job_id)
        if version is not None:
            query += " AND version = ?"
            params += (version,)
        return self._db.execute(query, params).rowcount > 0

    def start(self, job: JobRow, token: str) -> None:
        """``token`` names this run: only its outcome is recorded (see ``holds``)."""
        with self.batch():
            self._start(job, token)

    def _start(self, job: JobRow, token: str) -> None:
        self._db.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, token = ?, updated = ? WHERE job_id = ?",
            (token, self._wallclock(), job.job_id),
        )
        self._db.execute(
            "INSERT INTO groups (grp, served) VALUES (?, ?) "
            "ON CONFLICT(grp) DO UPDATE SET served = excluded.served",
            (job.grp, self._wallclock()),
        )

    def holds(self, job_id: str, token: str) -> bool:
        """Whether the run ``token`` is still the one this job waits for (``finish`` checks the version)."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE job_id = ? AND token = ? AND state = 'running'", (job_id, token)
        ).fetchone()
        return row is not None

    def finish(self, job: JobRow, state: str, error: str | None = None, *, unwritten: bool = False) -> None:
        """Record the outcome of ``job``'s version; a newer version stays queued.

        Called once the outcome's files are in place and synced (or spooled), so a recorded
        outcome is never lost to a crash; ``unwritten``: the outbox kept them in memory only,
        and a restart that finds them missing runs the job again (``unwritten_jobs``).
        """
        if not self.set_state(job.job_id, state, version=job.version, error=error, unwritten=unwritten):
            self.set_state(job.job_id, "queued")

    def written(self, job_id: str) -> None:
        """The files of the job's recorded outcome landed after all."""
        self._db.execute("UPDATE jobs SET unwritten = 0 WHERE job_id = ? AND unwritten = 1", (job_id,))

    def unwritten_jobs(self) -> list[JobRow]:
        rows = self._db.execute(
            "SELECT job_id, sidecar, image, image_sha, version, state, priority, grp, attempts, error "
            "FROM jobs WHERE unwritten = 1"
        ).fetchall()
        return [JobRow(*row) for row in rows]

    def next_job(self, *, exclude: frozenset[str] = frozenset()) -> JobRow | None:
        """Highest priority first; among equals, the folder served longest ago, then oldest."""
        rows = self._db.execute(
            "SELECT j.job_id, j.sidecar, j.image, j.image_sha, j.version, j.state, j.priority, j.grp, j.attempts, j.error "
            "FROM jobs j LEFT JOIN groups g ON g.grp = j.grp WHERE j.state = 'queued' "
            "ORDER BY j.priority DESC, COALESCE(g.served, 0) ASC, j.seen ASC, j.job_id ASC LIMIT ?",
            (len(exclude) + 1,),
        ).fetchall()
        for row in rows:
            if row[0] not in exclude:
                return JobRow(*row)
        return None

    def jobs_in(self, states: tuple[str, ...]) -> list[JobRow]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(
            "SELECT job_id, sidecar, image, image_sha, version, state, priority, grp, attempts, error "
            f"FROM jobs WHERE state IN ({marks}) ORDER BY priority DESC, seen ASC",
            states,
        ).fetchall()
        return [JobRow(*row) for row in rows]

    def jobs_of_sidecar(self, sidecar: str) -> list[JobRow]:
        rows = self._db.execute(
            "SELECT job_id, sidecar, image, image_sha, version, state, priority, grp, attempts, error "
            "FROM jobs WHERE sidecar = ?",
            (sidecar,),
        ).fetchall()
        return [JobRow(*row) for row in rows]

    def latest(self, state: str, limit: int) -> list[tuple[str, str | None, float]]:
        """The ``limit`` jobs most recently put in ``state``, newest first: (job_id, error, updated)."""
        return [tuple(row) for row in self._db.execute(
            "SELECT job_id, error, updated FROM jobs WHERE state = ? ORDER BY updated DESC LIMIT ?", (state, limit),
        ).fetchall()]

    def all_job_ids(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT job_id FROM jobs")}

    def recover(self) -> int:
        """After a crash or kill: jobs that were running run again."""
        return self._db.execute(
            "UPDATE jobs SET state = 'queued', token = NULL, updated = ? WHERE state = 'running'", (self._wallclock(),)
        ).rowcount

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    # ---- file hashes ----------------------------------------------------------------

    def cached_hash(self, path: str, *, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str | None:
        """The sha256 stored for ``path`` when its stat stamp (``_HASH_STAMP``) is unchanged."""
        row = self._db.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND "
            + " AND ".join(f"{column} = ?" for column in _HASH_STAMP),
            (path, size, mtime_ns, ctime_ns, inode),
        ).fetchone()
        return row[0] if row else None

    def store_hash(self, path: str, sha256: str, *, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> None:
        self._db.execute(
            "INSERT INTO file_hashes (path, sha256, size, mtime_ns, ctime_ns, inode) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, "
            + ", ".join(f"{column} = excluded.{column}" for column in _HASH_STAMP),
            (path, sha256, size, mtime_ns, ctime_ns, inode),
        )
