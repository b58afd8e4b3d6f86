"""The weights registry as the daemon sees it: which checkpoint a (type, name) means, and
getting that file onto local disk, verified, without ever blocking the daemon's main loop.

Every model type has a built-in ``default`` entry (samapi's official URLs); config entries
override it or add names. URL entries are downloaded once into
``state_dir/weights/<type>/<file>-<hash of url><suffix>`` by one background thread per file
(``http``, ``hf``), verified against the entry's sha256 and recorded (``files``); a flock keeps
two processes from downloading the same file at once (``locks``).

Cancelling works in-process (:meth:`WeightsRegistry.cancel`) and across processes: the CLI
writes ``state_dir/weights/cancel`` (:func:`samwatch.weights.locks.request_cancel`), which every
download checks between chunks, as samapi's cancel file.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.families import MODEL_TYPES
from samwatch.vocab import LoadSpec
from samwatch.weights.entries import Key, as_url, download_path, entries_with_defaults, entry_identity, entry_key
from samwatch.weights.failures import checksum_mismatch, download_failed
from samwatch.weights.files import file_size, part_progress, sha256_file, sibling, verified_sha
from samwatch.weights.hf import fetch_hf, parse_hf_url, probe_hf
from samwatch.weights.http import Transfer, probe_http
from samwatch.weights.locks import CancelCheck, cancel_file_path, exclusive, held_elsewhere

POLL_SECONDS = 0.25

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class DownloadState:
    """A snapshot of one download, for the jobs waiting on it and for status files."""

    model_type: str
    name: str
    source: str
    state: Literal["downloading", "failed"] = "downloading"
    bytes_done: int = 0
    bytes_total: int | None = None
    error: JobError | None = None
    elsewhere: bool = False  # another process holds the file lock and is downloading it
    started: float = 0.0  # the registry's clock
    finished: float | None = None

    @property
    def percent(self) -> float:
        """0-100; 0 while the size is unknown (bytes_total None), so progress files stay numeric."""
        if not self.bytes_total:
            return 0.0
        # hf (xet) progress can count some bytes twice; a percentage above 100 helps nobody
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "percent": self.percent,
            "elsewhere": self.elsewhere,
            "error": self.error.to_dict() if self.error is not None else None,
        }



@dataclass
class _Download:
    entry: WeightsEntry
    target: Path
    state: DownloadState  # replaced (never mutated) under the registry lock
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class WeightsRegistry:
    """The registry: entries by (type, name), their files, and the downloads under way.

    Thread-safe: the daemon's main loop calls :meth:`request` while download threads run.
    """

    def __init__(
        self,
        entries: Iterable[WeightsEntry],
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_after_seconds: float = 60.0,
        opener: urllib.request.OpenerDirector | None = None,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._weights_dir = self._state_dir / "weights"
        self._clock = clock
        self._retry_after = retry_after_seconds
        self._opener = opener or urllib.request.build_opener()
        self._lock = threading.Lock()
        self._entries = entries_with_defaults(entries)
        self._downloads: dict[Path, _Download] = {}
        self._retired: list[_Download] = []  # cancelled by update(), still winding down
        self._hashes: dict[Path, tuple[int, int, int, str]] = {}  # path -> size, mtime_ns, inode, sha256

    # -- entries -------------------------------------------------------------------------

    def entries(self) -> list[WeightsEntry]:
        with self._lock:
            table = self._entries
        return sorted(table.values(), key=lambda e: (MODEL_TYPES.index(e.type), e.name != "default", e.name))

    def entry(self, model_type: str, name: str) -> WeightsEntry:
        with self._lock:
            table = self._entries
        found = table.get((model_type, name))
        if found is not None:
            return found
        if model_type not in MODEL_TYPES:
            raise JobError(
                "unknown_model",
                f"{model_type!r} is not a model type samwatch knows; use one of {', '.join(MODEL_TYPES)}.",
                field="model",
            )
        names = sorted(n for t, n in table if t == model_type)
        raise JobError(
            "unknown_weights",
            f"No weights named {name!r} are registered for {model_type}; registered: {', '.join(names)}. "
            f"Add them with `samwatch weights add NAME {model_type} URL`.",
            field="weights",
        )

    def file_path(self, entry: WeightsEntry) -> Path:
        """The local file of an entry: its path, or where its download is kept."""
        return entry.path if entry.path is not None else download_path(self._weights_dir, entry)

    def update(self, entries: Iterable[WeightsEntry]) -> set[Key]:
        """Apply a reloaded config; the keys whose source, sha256 or config changed or vanished."""
        fresh = entries_with_defaults(entries)
        with self._lock:
            old, self._entries = self._entries, fresh
            changed = {key for key, entry in old.items() if entry_identity(fresh.get(key)) != entry_identity(entry)}
            wanted = {self.file_path(e) for e in fresh.values() if e.url is not None}
            for target, download in list(self._downloads.items()):
                unwanted = target not in wanted
                # a failure of an entry that was just edited must not hold back the retry
                stale_failure = download.state.state == "failed" and entry_key(download.entry) in changed
                if unwanted or stale_failure:
                    download.cancel.set()
                    self._retired.append(self._downloads.pop(target))
            self._retired = [d for d in self._retired if not d.finished.is_set()]
        if changed:
            logger.info("weights registry reloaded; changed: {}", ", ".join(f"{t}/{n}" for t, n in sorted(changed)))
        return changed

    # -- getting files -------------------------------------------------------------------

    def request(self, model_type: str, name: str) -> LoadSpec | DownloadState:
        """The verified checkpoint, or the state of the (background) download that fetches it.

        Never waits for a download. A failed download is returned as is until
        ``retry_after_seconds`` have passed; the next request after that retries. A path entry's
        file is hashed here, once per version of the file (size, mtime, inode).
        """
        entry = self.entry(model_type, name)
        if entry.path is not None:
            return self._path_spec(entry)
        outcome = self._url_request(entry, force=False)
        return outcome if isinstance(outcome, LoadSpec) else outcome.state

    def on_disk(self, model_type: str, name: str) -> bool:
        """Whether the entry's file is there and verified now (fetched by anyone); never hashes or fetches."""
        try:
            entry = self.entry(model_type, name)
        except JobError:
            return False
        if entry.path is not None:
            return entry.path.is_file()
        return verified_sha(entry, self.file_path(entry)) is not None

    def unobtainable(self, model_type: str, name: str) -> JobError | None:
        """Why these weights could not be had now (``samwatch check``): None if on disk or reachable."""
        entry = self.entry(model_type, name)
        if entry.path is not None or self._verified_spec(entry) is not None:
            return None
        try:
            ref = parse_hf_url(entry.url or "")
        except ValueError as exc:
            return download_failed(entry, str(exc))
        return probe_hf(entry, ref) if ref is not None else probe_http(entry, self._opener)

    def fetch(self, model_type: str, name: str, progress: Progress | None = None) -> LoadSpec:
        """Like :meth:`request`, but waits (for the CLI); raises the download's JobError."""
        entry = self.entry(model_type, name)
        if entry.path is not None:
            return self._path_spec(entry)
        outcome = self._url_request(entry, force=True)
        if isinstance(outcome, LoadSpec):
            return outcome
        while not outcome.finished.wait(POLL_SECONDS):
            if progress is not None:
                progress(outcome.state.bytes_done, outcome.state.bytes_total)
        state = outcome.state
        if state.error is not None:
            raise state.error
        if progress is not None:
            progress(state.bytes_done, state.bytes_total)
        spec = self._verified_spec(entry)
        if spec is None:
            raise download_failed(entry, "the downloaded file vanished from the state folder")
        return spec

    def cancel(self, model_type: str | None = None, name: str | None = None) -> int:
        """Stop this process's matching downloads; how many were asked to stop."""
        with self._lock:
            matching = [
                d
                for d in self._downloads.values()
                if not d.finished.is_set() and model_type in (None, d.entry.type) and name in (None, d.entry.name)
            ]
        for download in matching:
            download.cancel.set()
        return len(matching)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every download and wait (up to ``timeout`` seconds) for their threads."""
        with self._lock:
            downloads = [*self._downloads.values(), *self._retired]
        for download in downloads:
            download.cancel.set()
        deadline = time.monotonic() + timeout
        for download in downloads:
            if download.thread is not None:
                download.thread.join(max(0.0, deadline - time.monotonic()))

    # -- listings ------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """Every entry with its file: for ``samwatch weights list`` and ``_samwatch/status.json``.

        ``state`` is ready, not fetched, missing (a path entry's file is gone), downloading or failed.
        """
        return [self._describe(entry) for entry in self.entries()]

    def samapi_listing(self) -> list[dict[str, str]]:
        """samapi's GET /sam/weights/ items, for ``_samwatch/weights.json``."""
        return [{"type": e.type, "name": e.name, "URL": as_url(e)} for e in self.entries()]

    def _describe(self, entry: WeightsEntry) -> dict[str, Any]:
        path = self.file_path(entry)
        item: dict[str, Any] = {
            "name": entry.name,
            "type": entry.type,
            "source": entry.source,
            "sha256": entry.sha256,
            "path": str(path),
            "on_disk": False,
            "size_bytes": None,
            "state": "not fetched" if entry.url is not None else "missing",
        }
        if entry.path is not None:
            size = file_size(path)
            if size is not None:
                item.update(on_disk=True, size_bytes=size, state="ready")
            with self._lock:
                cached = self._hashes.get(path)
            if entry.sha256 is None and cached is not None:
                item["sha256"] = cached[3]  # listing never hashes: only what a request already did
            return item
        sha = verified_sha(entry, path)
        if sha is not None:
            item.update(on_disk=True, size_bytes=file_size(path), sha256=sha, state="ready")
            return item
        with self._lock:
            download = self._downloads.get(path)
        if download is not None:
            item.update(download.state.to_dict())
        elif held_elsewhere(sibling(path, ".lock")):
            done, total = part_progress(path)
            elsewhere = DownloadState(
                entry.type, entry.name, entry.source, bytes_done=done, bytes_total=total, elsewhere=True
            )
            item.update(elsewhere.to_dict())
        return item

    # -- internals -----------------------------------------------------------------------

    def _path_spec(self, entry: WeightsEntry) -> LoadSpec:
        assert entry.path is not None
        sha = self._path_sha(entry, entry.path)
        if entry.sha256 is not None and sha != entry.sha256:
            raise checksum_mismatch(entry, sha, f"The weights file {entry.path}", "not loaded")
        return LoadSpec(entry.type, entry.path, entry.name, sha, entry.config, str(entry.path))

    def _path_sha(self, entry: WeightsEntry, path: Path) -> str:
        """The file's sha256, hashed once per (size, mtime, inode): a 2.5 GB file is not re-read per job."""
        try:
            stat = path.stat()
            identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            with self._lock:
                cached = self._hashes.get(path)
            if cached is not None and cached[:3] == identity:
                return cached[3]
            sha = sha256_file(path)
        except OSError as exc:
            raise JobError(
                "weights_unavailable",
                f"The weights file {path} registered as {entry.type} {entry.name!r} cannot be read "
                f"({exc.strerror or exc}); check the path in the config's weights list.",
                field="weights",
            ) from None
        with self._lock:
            self._hashes[path] = (*identity, sha)
        logger.info("weights {}/{}: hashed {} (sha256 {})", entry.type, entry.name, path, sha)
        return sha

    def _verified_spec(self, entry: WeightsEntry) -> LoadSpec | None:
        target = self.file_path(entry)
        sha = verified_sha(entry, target)
        if sha is None:
            return None
        return LoadSpec(entry.type, target, entry.name, sha, entry.config, entry.source)

    def _url_request(self, entry: WeightsEntry, *, force: bool) -> LoadSpec | _Download:
        spec = self._verified_spec(entry)
        if spec is not None:
            return spec
        target = self.file_path(entry)
        with self._lock:
            download = self._downloads.get(target)
            if download is None or self._may_retry(download, force):
                download = self._start(entry, target)
            return download

    def _may_retry(self, download: _Download, force: bool) -> bool:
        state = download.state
        if state.state != "failed" or state.finished is None:
            return False
        return force or self._clock() - state.finished >= self._retry_after

    def _start(self, entry: WeightsEntry, target: Path) -> _Download:
        """Start a download thread; called with the lock held."""
        download = _Download(entry, target, DownloadState(entry.type, entry.name, entry.source, started=self._clock()))
        download.thread = threading.Thread(
            target=self._run, args=(download,), name=f"samwatch-weights-{entry.type}-{entry.name}", daemon=True
        )
        self._downloads[target] = download
        download.thread.start()
        logger.info("weights {}/{}: fetching {} into {}", entry.type, entry.name, entry.url, target)
        return download

    def _run(self, download: _Download) -> None:
        entry = download.entry
        check = CancelCheck(
            download.cancel, cancel_file_path(self._state_dir), entry.type, entry.name, time.time_ns()
        )
        try:
            sha = self._obtain(download, check)
        # The reason is logged once, by whoever receives the error: each waiting job's summary
        # line, or the CLI's fetch; here only the event.
        except JobError as error:
            logger.info("weights {}/{}: download stopped ({})", entry.type, entry.name, error.code)
            self._finish(download, error)
        except OSError as exc:  # network errors are JobErrors by now: this is the local disk
            reason = f"cannot write into {download.target.parent} ({exc.strerror or exc})"
            logger.info("weights {}/{}: download stopped (local disk)", entry.type, entry.name)
            self._finish(download, download_failed(entry, reason))
        except Exception as exc:  # a bug must fail the waiting jobs, not leave them waiting forever
            logger.exception("weights {}/{}: the download crashed", entry.type, entry.name)
            self._finish(download, download_failed(entry, f"{type(exc).__name__}: {exc}"))
        else:
            logger.info("weights {}/{}: ready, sha256 {}", entry.type, entry.name, sha)
            self._finish(download, None)

    def _obtain(self, download: _Download, check: CancelCheck) -> str:
        entry, target = download.entry, download.target
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer = Transfer(entry, target, partial(self._report, download), check)
        with exclusive(sibling(target, ".lock"), partial(self._wait_elsewhere, download, transfer)):
            sha = verified_sha(entry, target)
            if sha is not None:
                return sha  # another process fetched it while this one waited for the lock
            try:
                ref = parse_hf_url(entry.url or "")
            except ValueError as exc:
                raise download_failed(entry, str(exc)) from None
            if ref is not None:
                return fetch_hf(transfer, ref, self._weights_dir / "hf" / target.name)
            return transfer.http(self._opener)

    def _wait_elsewhere(self, download: _Download, transfer: Transfer) -> None:
        transfer.check()
        if not download.state.elsewhere:
            logger.info(
                "weights {}/{}: another process is downloading {}; waiting for it",
                download.entry.type,
                download.entry.name,
                download.target.name,
            )
        done, total = transfer.progress_elsewhere()
        self._report(download, done, total, elsewhere=True)
        download.cancel.wait(POLL_SECONDS)

    def _report(self, download: _Download, done: int, total: int | None, elsewhere: bool = False) -> None:
        with self._lock:
            download.state = replace(download.state, bytes_done=done, bytes_total=total, elsewhere=elsewhere)

    def _finish(self, download: _Download, error: JobError | None) -> None:
        with self._lock:
            if error is not None:
                download.state = replace(download.state, state="failed", error=error, finished=self._clock())
            elif self._downloads.get(download.target) is download:
                del self._downloads[download.target]
        download.finished.set()
