"""The outbox: each job's result, progress and error files, and the daemon's own state files.

``JobOutputs`` is the one writer of a job's file states; ``Outbox`` keeps writes the disk
refused (full, read-only, gone) and retries them until they land. Every file goes through
``samwatch.atomic``, so a reader on a share never sees half a file.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from loguru import logger

from samwatch.atomic import atomic_write_bytes, atomic_write_json, now_iso, stage_bytes

STATE_FOLDER = "_samwatch"
#: Files that belong to a result and live and die with it (see samwatch/outputs/).
PREVIEW_SUFFIX = ".preview.png"
LABELS_SUFFIX = ".labels.tif"
LABELS_CSV_SUFFIX = ".labels.csv"
EXTRA_SUFFIXES = (PREVIEW_SUFFIX, LABELS_SUFFIX, LABELS_CSV_SUFFIX)


class ProgressState(str, Enum):
    """The ``state`` of a progress file (CONTRACT.md): only ``JobOutputs`` writes them."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({ProgressState.DONE, ProgressState.FAILED, ProgressState.CANCELLED})


@dataclass(frozen=True)
class JobOutputs:
    """The outbox files of one job, mirroring its inbox path (``exp1/img001.cells``).

    The one writer of a job's file states: each method is one state a person can see, so no
    state string is spelled anywhere else. A final state and its result or error file are
    written together, result first, so a reader who sees ``done`` finds the result.
    """

    outbox: Path
    stem: str  # relative path without suffix, e.g. "exp1/img001.cells"

    def _path(self, suffix: str) -> Path:
        return self.outbox / f"{self.stem}{suffix}"

    @property
    def result(self) -> Path:
        return self._path(".geojson")

    @property
    def progress(self) -> Path:
        return self._path(".progress.json")

    @property
    def error(self) -> Path:
        return self._path(".error.json")

    @property
    def extras(self) -> tuple[Path, ...]:
        """Preview, label image and table: present only beside a result of the same run."""
        return tuple(self._path(suffix) for suffix in EXTRA_SUFFIXES)

    def queued(self, message: str = "waiting for its turn", *, stage: str = "queued", percent: float = 0) -> None:
        self._write_progress(ProgressState.QUEUED, stage, percent, message)

    def waiting(self, stage: str, percent: float, message: str) -> None:
        """Queued until something it needs (weights being fetched) is ready."""
        self._write_progress(ProgressState.QUEUED, stage, percent, message)

    def running(self, stage: str, percent: float, message: str = "") -> None:
        self._write_progress(ProgressState.RUNNING, stage, percent, message)

    def done(self, collection: dict[str, Any] | orjson.Fragment | None, message: str,
             extras: Mapping[str, bytes] | None = None) -> None:
        """``collection`` None: the result is already there (another daemon wrote it); a
        ``Fragment``: encoded already (atomic.py ``encoded_now``).

        ``extras`` (suffix -> bytes, see ``EXTRA_SUFFIXES``) are written aside first and renamed
        into place just before the GeoJSON, so whoever sees a result finds its extras; an extra
        this result lacks (an older version's preview) is removed.
        """
        if collection is not None:
            self._place_extras(extras or {})
            atomic_write_json(self.result, collection, sync_folder=False)  # synced with the progress file's folder
            self.error.unlink(missing_ok=True)
        self._write_progress(ProgressState.DONE, ProgressState.DONE.value, 100, message)

    def _place_extras(self, extras: Mapping[str, bytes]) -> None:
        unknown = set(extras) - set(EXTRA_SUFFIXES)
        if unknown:
            raise ValueError(f"not a result extra: {sorted(unknown)}")
        staged: list[tuple[Path, Path]] = []
        try:
            for suffix, data in extras.items():
                staged.append((stage_bytes(self._path(suffix), data), self._path(suffix)))
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for suffix in EXTRA_SUFFIXES:
            if suffix not in extras:
                try:
                    self._path(suffix).unlink()
                except (FileNotFoundError, NotADirectoryError):
                    pass  # not there, or not even its folder: nothing stale to remove

    def failed(self, error: dict[str, Any] | None, percent: float, message: str) -> None:
        # One outcome per content version: a stale result of an earlier version goes, its
        # extras after it (a reader that sees no result expects no extras).
        if error is not None:
            atomic_write_json(self.error, {**error, "updated": now_iso()}, sync_folder=False)
            for path in (self.result, *self.extras):
                path.unlink(missing_ok=True)
        self._write_progress(ProgressState.FAILED, ProgressState.FAILED.value, percent, message)

    def cancelled(self, percent: float, message: str) -> None:
        self._write_progress(ProgressState.CANCELLED, ProgressState.CANCELLED.value, percent, message)

    def shows(self, state: str) -> bool:
        """Whether the files of a ``done``/``failed`` outcome are all in place (its result or error
        goes before the final progress file, so a final progress file vouches for them)."""
        try:
            progress = orjson.loads(self.progress.read_bytes())
        except (OSError, ValueError):
            return False
        return progress.get("state") == state and (self.result if state == "done" else self.error).is_file()

    def restore_final(self, state: str, message: str) -> None:
        """Another daemon's outcome (``done``/``failed``/``cancelled``): its files stand, progress says so."""
        final = ProgressState(state)
        self._write_progress(final, final.value, 100 if final is ProgressState.DONE else 0, message)

    def _write_progress(self, state: ProgressState, stage: str, percent: float, message: str) -> None:
        # Progress is advisory and frequent: atomic, but only final states are fsync'd.
        payload = {
            "state": state.value,
            "stage": stage,
            "percent": int(max(0, min(100, round(percent)))),
            "message": message,
            "updated": now_iso(),
        }
        atomic_write_json(self.progress, payload, durable=state in FINAL_STATES)


#: final writes a full disk refused wait here (under state_dir) for the outbox to come back
SPOOL_FOLDER = "outbox-pending"
_FINAL_METHODS = frozenset({"done", "failed", "cancelled", "restore_final"})
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


class Outbox:
    """The outbox folder as the daemon writes it: every job's file states, and ``_samwatch``.

    Call sites name a state by its method (``outbox.done(job_id, ...)``), never by a string.
    The outbox is someone else's disk: it fills up, goes read-only, vanishes. No write here
    raises. A write the disk refuses is kept (the latest per job: a later state supersedes
    it; final ones also spooled under ``state_dir`` to survive a restart) and retried with
    backoff by ``retry``; ``problem`` says what is wrong, for status.json and the log. The
    ledger already holds every outcome, so nothing is lost while the disk is away.
    """

    def __init__(self, root: Path, *, spool: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.state_folder = root / STATE_FOLDER
        self._spool = spool
        self._clock = clock
        self._lock = threading.Lock()  # progress arrives from executor threads too
        self._pending: dict[str, Callable[[], None]] = {}  # key -> the latest write refused
        self._landed: list[str] = []  # jobs whose kept writes landed since ``take_landed``
        self._next_retry = float("-inf")
        self._backoff = RETRY_FIRST_SECONDS
        self.problem: dict[str, Any] | None = None
        self._load_spool()

    # ---- the job file states ------------------------------------------------------------

    def job(self, job_id: str) -> JobOutputs:
        return JobOutputs(self.root, job_id)

    def queued(self, job_id: str, message: str = "waiting for its turn") -> None:
        self._write(job_id, "queued", message=message)

    def waiting(self, job_id: str, stage: str, percent: float, message: str) -> None:
        self._write(job_id, "waiting", stage=stage, percent=percent, message=message)

    def running(self, job_id: str, stage: str, percent: float, message: str = "") -> None:
        self._write(job_id, "running", stage=stage, percent=percent, message=message)

    def done(
        self, job_id: str, collection: dict[str, Any] | orjson.Fragment | None, message: str,
        extras: Mapping[str, bytes] | None = None,
    ) -> bool:
        """True once the files are in place and synced, or spooled to be written at the next
        chance (even after a restart); False: kept in memory only (see ``take_landed``)."""
        return self._write(job_id, "done", collection=collection, message=message, extras=extras)

    def failed(self, job_id: str, error: dict[str, Any] | None, percent: float, message: str) -> bool:
        """As ``done``, for the error file."""
        return self._write(job_id, "failed", error=error, percent=percent, message=message)

    def cancelled(self, job_id: str, percent: float, message: str) -> None:
        self._write(job_id, "cancelled", percent=percent, message=message)

    def restore_final(self, job_id: str, state: str, message: str) -> None:
        self._write(job_id, "restore_final", state=state, message=message)

    def _write(self, job_id: str, method: str, **arguments: Any) -> bool:
        if self.attempt(f"job:{job_id}", partial(_replay, self.root, job_id, method, arguments)):
            self._unspool(job_id)
            return True
        return method in _FINAL_METHODS and self._spool_write(job_id, method, arguments)

    # ---- the daemon's own files -----------------------------------------------------------

    def ensure_folders(self) -> None:
        self.attempt("folders", lambda: self.state_folder.mkdir(parents=True, exist_ok=True), keep=False)

    def write_state_file(self, name: str, payload: Any) -> None:
        """A heartbeat-frequency file in ``_samwatch`` (status, weights listing): not fsync'd, not kept."""
        self.attempt(f"state:{name}", lambda: atomic_write_json(self.state_folder / name, payload, durable=False), keep=False)

    def write_state_page(self, name: str, text: str) -> None:
        """As ``write_state_file``, for a page people open (the dashboard)."""
        data = text.encode("utf-8")
        self.attempt(f"state:{name}", lambda: atomic_write_bytes(self.state_folder / name, data, durable=False), keep=False)

    # ---- faults -------------------------------------------------------------------------------

    def attempt(self, key: str, write: Callable[[], None], *, keep: bool = True) -> bool:
        """Run ``write``; if the disk refuses it, keep it under ``key`` (superseding) for ``retry``."""
        with self._lock:
            try:
                write()
            except OSError as exc:
                if keep:
                    self._pending[key] = write
                self._failed(exc)
                return False
            superseded = self._pending.pop(key, None)
            if superseded is not None or (self.problem is not None and not self._pending):
                self._recovered()
            return True

    def retry(self) -> None:
        """Retry the kept writes, oldest first, once their backoff has passed."""
        if not self._pending or self._clock() < self._next_retry:
            return
        for key, write in list(self._pending.items()):
            if not self.attempt(key, write):
                return
            if key.startswith("job:"):
                self._unspool(key[4:])
                self._landed.append(key[4:])

    def take_landed(self) -> list[str]:
        """The jobs whose kept writes are in place since the last call: their outcomes are whole now."""
        landed, self._landed = self._landed, []
        return landed

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def note_failure(self, exc: OSError) -> None:
        """A write elsewhere in the outbox (a claim) failed: the same problem, the same report."""
        with self._lock:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        code = errno.errorcode.get(exc.errno or 0, "OSError")
        if self.problem is None or self.problem["error"] != code:
            logger.error(
                f"outbox write failed ({code}: {exc.strerror or exc}, {exc.filename or self.root}); outcomes stay "
                "in the ledger and their files are written when the outbox is writable again"
            )
            self.problem = {"error": code, "message": f"{exc.strerror or exc}: {exc.filename or self.root}", "since": now_iso()}
        self.problem["pending_writes"] = len(self._pending)
        self._next_retry = self._clock() + self._backoff
        self._backoff = min(RETRY_MAX_SECONDS, self._backoff * 2)

    def _recovered(self) -> None:
        if self._pending:
            self.problem["pending_writes"] = len(self._pending)
            return
        if self.problem is not None:
            logger.info(f"outbox writable again after {self.problem['error']}; every kept write is done")
        self.problem = None
        self._backoff = RETRY_FIRST_SECONDS
        self._next_retry = float("-inf")

    # ---- the spool: kept final writes that survive a restart ------------------------------------

    def _spool_path(self, job_id: str) -> Path | None:
        if self._spool is None:
            return None
        return self._spool / f"{hashlib.sha1(job_id.encode()).hexdigest()}.json"

    def _spool_write(self, job_id: str, method: str, arguments: dict[str, Any]) -> bool:
        path = self._spool_path(job_id)
        if path is None:
            return False
        if arguments.get("extras"):  # preview and label bytes, as JSON text
            arguments = {**arguments, "extras": {k: base64.b64encode(v).decode() for k, v in arguments["extras"].items()}}
        try:
            atomic_write_json(path, {"job": job_id, "method": method, "arguments": arguments})
        except OSError as exc:  # the state disk too: the write stays in memory only
            logger.warning(f"cannot spool the kept outbox write of {job_id}: {exc}")
            return False
        return True

    def _unspool(self, job_id: str) -> None:
        path = self._spool_path(job_id)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def _load_spool(self) -> None:
        if self._spool is None or not self._spool.is_dir():
            return
        for path in sorted(self._spool.glob("*.json")):
            try:
                entry = orjson.loads(path.read_bytes())
                job_id, method, arguments = entry["job"], entry["method"], entry["arguments"]
                if arguments.get("extras"):
                    arguments["extras"] = {k: base64.b64decode(v) for k, v in arguments["extras"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if method not in _FINAL_METHODS:
                continue
            self._pending[f"job:{job_id}"] = partial(_replay, self.root, job_id, method, arguments)
        if self._pending:
            logger.info(f"{len(self._pending)} outbox writes kept from an earlier run are written when possible")


def _replay(root: Path, job_id: str, method: str, arguments: dict[str, Any]) -> None:
    """One ``JobOutputs`` state write, by name: how a kept (or spooled) write is done later."""
    getattr(JobOutputs(root, job_id), method)(**arguments)
