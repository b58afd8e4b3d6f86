"""The weights registry as the daemon sees it: which checkpoint a (type, name) means, and
getting that file onto local disk, verified, without ever blocking the daemon's main loop.

Every model type has a built-in ``default`` entry (samapi's official URLs); config entries
override it or add names. URL entries are downloaded once into
``state_dir/weights/<type>/<file>-<hash of url><suffix>`` by one background thread per file.
A download streams into ``<file>.part``, is fsynced and hashed, verified against the entry's
sha256, and only then renamed into place beside ``<file>.json`` (url, sha256, size, fetched):
that record is what marks a file as verified, so a half-written or unverified file is never
loaded. ``<file>.lock`` (flock) keeps two processes — two daemons, or the CLI and a daemon —
from downloading the same file at once; the second one waits and reports the first's progress.

Cancelling works in-process (:meth:`WeightsRegistry.cancel`) and across processes: the CLI
writes ``state_dir/weights/cancel`` (:func:`request_cancel`), which every download checks
between chunks, as samapi's cancel file.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from loguru import logger

from samwatch.config import WeightsEntry
from samwatch.outbox import fsync_dir
from samwatch.errors import JobError
from samwatch.models.base import LoadSpec
from samwatch.modeltypes import DEFAULT_WEIGHT_URLS, MODEL_TYPES

CHUNK_BYTES = 1024 * 1024
_TIMEOUT_SECONDS = 60.0
_POLL_SECONDS = 0.25
_HF_SCHEME = "hf://"
_HF_HTTPS = re.compile(
    r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/(?P<revision>[^/]+)/(?P<file>.+)$"
)
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")

Key = tuple[str, str]
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


@dataclass(frozen=True)
class HfRef:
    repo_id: str
    filename: str
    revision: str | None


def parse_hf_url(url: str) -> HfRef | None:
    """``hf://owner/repo/path/in/repo[@revision]`` or a huggingface.co resolve/blob URL.

    None for any other URL; ValueError for an ``hf://`` URL without a file.
    """
    match = _HF_HTTPS.match(url)
    if match:
        return HfRef(match["repo"], match["file"], match["revision"])
    if not url.startswith(_HF_SCHEME):
        return None
    location, _, revision = url[len(_HF_SCHEME) :].partition("@")
    parts = location.split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{url} is not a valid hf:// URL: expected hf://owner/repo/path/in/repo[@revision]")
    return HfRef(f"{parts[0]}/{parts[1]}", parts[2], revision or None)


def download_path(weights_dir: Path, entry: WeightsEntry) -> Path:
    """Where a URL entry's file lives: the URL's file name plus a short hash of the whole URL
    (two URLs ending in ``model.pt`` must not collide), the suffix kept for the loader."""
    assert entry.url is not None
    try:
        ref = parse_hf_url(entry.url)
    except ValueError:
        ref = None
    base = PurePosixPath(ref.filename if ref else urlsplit(entry.url).path).name
    base = _UNSAFE_CHARS.sub("_", base).lstrip(".") or "weights"
    stem, suffix = PurePosixPath(base).stem, PurePosixPath(base).suffix
    digest = hashlib.sha256(entry.url.encode()).hexdigest()[:8]
    return weights_dir / entry.type / f"{stem}-{digest}{suffix}"


def cancel_file_path(state_dir: Path) -> Path:
    return Path(state_dir) / "weights" / "cancel"


def request_cancel(state_dir: Path, model_type: str | None = None, name: str | None = None) -> Path:
    """Ask every process downloading (matching) weights under ``state_dir`` to stop."""
    path = cancel_file_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {key: value for key, value in (("type", model_type), ("name", name)) if value is not None}
    _write_json(path, body | {"requested": _now_iso()})
    return path


@dataclass
class _Download:
    entry: WeightsEntry
    target: Path
    state: DownloadState  # replaced (never mutated) under the registry lock
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class _CancelCheck:
    """Raises JobError("cancelled") once this download is cancelled, here or by the cancel file."""

    event: threading.Event
    cancel_file: Path
    model_type: str
    name: str
    since_ns: int  # wall clock at the download's start: older cancel requests were for others

    def __call__(self) -> None:
        if self.event.is_set() or self._requested_by_file():
            raise JobError(
                "cancelled",
                f"The download of the {self.model_type} weights {self.name!r} was cancelled "
                "(samwatch weights cancel, a config change or shutdown); a later job starts it again.",
            )

    def _requested_by_file(self) -> bool:
        try:
            if self.cancel_file.stat().st_mtime_ns < self.since_ns:
                return False
            request = json.loads(self.cancel_file.read_text() or "{}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True  # a garbled request is still a request to stop
        if not isinstance(request, dict):
            return True
        return request.get("type") in (None, self.model_type) and request.get("name") in (None, self.name)


@dataclass(frozen=True)
class _Transfer:
    """One attempt at getting one URL entry's file into place; runs with the file lock held."""

    entry: WeightsEntry
    target: Path
    report: Callable[[int, int | None], None]
    check: Callable[[], None]

    @property
    def part(self) -> Path:
        return _sibling(self.target, ".part")

    @property
    def part_info(self) -> Path:
        return _sibling(self.target, ".part.json")

    def http(self, opener: urllib.request.OpenerDirector) -> str:
        offset, validator = self._resume_point()
        response = self._open(opener, offset, validator)
        with response:
            offset, total, validator = self._accept(response, offset, validator)
            _write_json(self.part_info, {"url": self.entry.url, "validator": validator, "total": total})
            try:
                digest, done = self._stream(response, offset, total)
                if total is not None and done != total:
                    raise _download_failed(self.entry, f"the connection closed after {done} of {total} bytes")
            except JobError as error:
                # a resumable .part is worth keeping for the retry; anything else starts clean
                if error.code == "cancelled" or validator is None:
                    self._discard()
                raise
        sha = digest.hexdigest()
        if self.entry.sha256 is not None and sha != self.entry.sha256:
            self._discard()
            raise _checksum_mismatch(self.entry, sha, f"The file downloaded from {self.entry.url}", "deleted")
        self._install(self.part, sha)
        return sha

    def hf(self, ref: HfRef, staging: Path) -> str:
        import huggingface_hub  # only downloads pay for importing it

        try:
            downloaded = Path(
                huggingface_hub.hf_hub_download(
                    repo_id=ref.repo_id,
                    filename=ref.filename,
                    revision=ref.revision,
                    local_dir=staging,
                    tqdm_class=_hf_progress_class(self.report, self.check),
                )
            )
        except JobError:  # cancelled from the progress hook
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as exc:  # huggingface_hub raises many types; each must become a job error
            raise _hf_error(self.entry, ref, exc) from None
        sha = _sha256_file(downloaded)
        if self.entry.sha256 is not None and sha != self.entry.sha256:
            shutil.rmtree(staging, ignore_errors=True)
            raise _checksum_mismatch(self.entry, sha, f"The file downloaded from {self.entry.url}", "deleted")
        self._install(downloaded, sha)
        shutil.rmtree(staging, ignore_errors=True)
        return sha

    def progress_elsewhere(self) -> tuple[int, int | None]:
        return _part_progress(self.target)

    def _resume_point(self) -> tuple[int, str | None]:
        """Where a leftover .part (a dead process's, or a broken connection's) may resume.

        Only with a validator (ETag/Last-Modified) recorded for the same URL: the server then
        sends the rest only if the file is unchanged (If-Range), else the whole file again.
        """
        if not self.part.exists():
            return 0, None
        info = _read_json(self.part_info)
        validator = info.get("validator") if info.get("url") == self.entry.url else None
        if not isinstance(validator, str) or validator.startswith("W/"):
            self._discard()
            return 0, None
        return self.part.stat().st_size, validator

    def _open(self, opener: urllib.request.OpenerDirector, offset: int, validator: str | None) -> Any:
        headers = {"User-Agent": "samwatch"}
        if offset and validator:
            headers |= {"Range": f"bytes={offset}-", "If-Range": validator}
        request = urllib.request.Request(self.entry.url or "", headers=headers)
        try:
            return opener.open(request, timeout=_TIMEOUT_SECONDS)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:  # the .part is longer than the file now is
                self._discard()
                return self._open(opener, 0, None)
            raise _http_error(self.entry, exc.code, exc.reason) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise _download_failed(self.entry, f"cannot reach the server ({reason})") from None

    def _accept(self, response: Any, offset: int, validator: str | None) -> tuple[int, int | None, str | None]:
        """(offset, total, validator) of what the server actually sends."""
        status = response.status or 200  # file:// responses carry no status
        headers = response.headers
        if offset and status == 206:
            start, total = _content_range(headers.get("Content-Range"))
            if start == offset:
                return offset, total, validator
            self._discard()
            raise _download_failed(self.entry, "the server answered the resume request with another range")
        length = headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return 0, total, headers.get("ETag") or headers.get("Last-Modified")

    def _stream(self, response: Any, offset: int, total: int | None) -> tuple[Any, int]:
        digest = _sha256_prefix(self.part, offset)
        with self.part.open("r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            done = offset
            self.report(done, total)
            while chunk := self._read(response):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                self.report(done, total)
            out.flush()
            os.fsync(out.fileno())
        return digest, done

    def _read(self, response: Any) -> bytes:
        self.check()
        try:
            # read1: whatever has arrived (up to a chunk), so cancel is honoured on slow links too
            return response.read1(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise _download_failed(self.entry, f"the connection broke ({exc or type(exc).__name__})") from None

    def _install(self, source: Path, sha: str) -> None:
        # the record first: a crash before the rename leaves a record without a file, i.e. not on disk
        record = {"url": self.entry.url, "sha256": sha, "size": source.stat().st_size, "fetched": _now_iso()}
        _write_json(_sibling(self.target, ".json"), record)
        self.part_info.unlink(missing_ok=True)  # housekeeping done before the file becomes visible
        os.replace(source, self.target)
        fsync_dir(self.target.parent)

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.part_info.unlink(missing_ok=True)


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
        self._entries = _with_defaults(entries)
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
        fresh = _with_defaults(entries)
        with self._lock:
            old, self._entries = self._entries, fresh
            changed = {key for key, entry in old.items() if _identity(fresh.get(key)) != _identity(entry)}
            wanted = {self.file_path(e) for e in fresh.values() if e.url is not None}
            for target, download in list(self._downloads.items()):
                unwanted = target not in wanted
                # a failure of an entry that was just edited must not hold back the retry
                stale_failure = download.state.state == "failed" and _key(download.entry) in changed
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

    def fetch(self, model_type: str, name: str, progress: Progress | None = None) -> LoadSpec:
        """Like :meth:`request`, but waits (for the CLI); raises the download's JobError."""
        entry = self.entry(model_type, name)
        if entry.path is not None:
            return self._path_spec(entry)
        outcome = self._url_request(entry, force=True)
        if isinstance(outcome, LoadSpec):
            return outcome
        while not outcome.finished.wait(_POLL_SECONDS):
            if progress is not None:
                progress(outcome.state.bytes_done, outcome.state.bytes_total)
        state = outcome.state
        if state.error is not None:
            raise state.error
        if progress is not None:
            progress(state.bytes_done, state.bytes_total)
        spec = self._verified_spec(entry)
        if spec is None:
            raise _download_failed(entry, "the downloaded file vanished from the state folder")
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
        return [{"type": e.type, "name": e.name, "URL": _as_url(e)} for e in self.entries()]

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
            size = _size(path)
            if size is not None:
                item.update(on_disk=True, size_bytes=size, state="ready")
            with self._lock:
                cached = self._hashes.get(path)
            if entry.sha256 is None and cached is not None:
                item["sha256"] = cached[3]  # listing never hashes: only what a request already did
            return item
        sha = _verified_sha(entry, path)
        if sha is not None:
            item.update(on_disk=True, size_bytes=_size(path), sha256=sha, state="ready")
            return item
        with self._lock:
            download = self._downloads.get(path)
        if download is not None:
            item.update(download.state.to_dict())
        elif _held_elsewhere(_sibling(path, ".lock")):
            done, total = _part_progress(path)
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
            raise _checksum_mismatch(entry, sha, f"The weights file {entry.path}", "not loaded")
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
            sha = _sha256_file(path)
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
        sha = _verified_sha(entry, target)
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
        check = _CancelCheck(
            download.cancel, cancel_file_path(self._state_dir), entry.type, entry.name, time.time_ns()
        )
        try:
            sha = self._obtain(download, check)
        except JobError as error:
            logger.warning("weights {}/{}: {}", entry.type, entry.name, error.message)
            self._finish(download, error)
        except OSError as exc:  # network errors are JobErrors by now: this is the local disk
            reason = f"cannot write into {download.target.parent} ({exc.strerror or exc})"
            logger.warning("weights {}/{}: {}", entry.type, entry.name, reason)
            self._finish(download, _download_failed(entry, reason))
        except Exception as exc:  # a bug must fail the waiting jobs, not leave them waiting forever
            logger.exception("weights {}/{}: the download crashed", entry.type, entry.name)
            self._finish(download, _download_failed(entry, f"{type(exc).__name__}: {exc}"))
        else:
            logger.info("weights {}/{}: ready, sha256 {}", entry.type, entry.name, sha)
            self._finish(download, None)

    def _obtain(self, download: _Download, check: _CancelCheck) -> str:
        entry, target = download.entry, download.target
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer = _Transfer(entry, target, partial(self._report, download), check)
        with _exclusive(_sibling(target, ".lock"), partial(self._wait_elsewhere, download, transfer)):
            sha = _verified_sha(entry, target)
            if sha is not None:
                return sha  # another process fetched it while this one waited for the lock
            try:
                ref = parse_hf_url(entry.url or "")
            except ValueError as exc:
                raise _download_failed(entry, str(exc)) from None
            if ref is not None:
                return transfer.hf(ref, self._weights_dir / "hf" / target.name)
            return transfer.http(self._opener)

    def _wait_elsewhere(self, download: _Download, transfer: _Transfer) -> None:
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
        download.cancel.wait(_POLL_SECONDS)

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


# -- errors ------------------------------------------------------------------------------


def _download_failed(entry: WeightsEntry, reason: str) -> JobError:
    return JobError(
        "weights_download_failed",
        f"Downloading the {entry.type} weights {entry.name!r} from {entry.url} failed: {reason}. "
        "A later job retries; if it persists, check the url in the config's weights list.",
        field="weights",
    )


def _http_error(entry: WeightsEntry, code: int, reason: str) -> JobError:
    if code in (401, 403):
        return JobError(
            "weights_unavailable",
            f"The server refused access to the {entry.type} weights {entry.name!r} at {entry.url} "
            f"(HTTP {code} {reason}); check that samwatch may download that URL.",
            field="weights",
        )
    return _download_failed(entry, f"HTTP {code} {reason}")


def _checksum_mismatch(entry: WeightsEntry, actual: str, what: str, fate: str) -> JobError:
    return JobError(
        "weights_checksum_mismatch",
        f"{what} for the {entry.type} weights {entry.name!r} has sha256 {actual}, but the config "
        f"expects {entry.sha256}; it was {fate}. Fix the sha256 in the config, or the source.",
        field="weights",
        expected=entry.sha256,
        actual=actual,
    )


def _hf_error(entry: WeightsEntry, ref: HfRef, exc: Exception) -> JobError:
    """A huggingface_hub failure as the job error a person can act on."""
    import httpx
    from huggingface_hub import errors as hf

    what = f"The {entry.type} weights {entry.name!r} ({entry.url}) cannot be downloaded"
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return JobError(
            "weights_unavailable",
            f"{what}: Hugging Face cannot be reached and the file is not cached (offline, HF_HUB_OFFLINE "
            f"set, or a proxy needed?) ({detail}).",
            field="weights",
        )
    if isinstance(exc, hf.RepositoryNotFoundError) or status in (401, 403):
        owner = "SAM3" if entry.type == "sam3" else f"The {ref.repo_id}"
        why = "are gated" if isinstance(exc, hf.GatedRepoError) else "are gated, private or missing"
        return JobError(
            "weights_unavailable",
            f"{what}: {owner} weights {why}: request access at https://huggingface.co/{ref.repo_id}, then "
            f"`hf auth login` or set HF_TOKEN for the samwatch user. Other models keep working ({detail}).",
            field="weights",
        )
    if isinstance(exc, hf.RevisionNotFoundError | hf.EntryNotFoundError):
        return JobError(
            "weights_unavailable",
            f"{what}: {ref.repo_id} has no file {ref.filename} at revision {ref.revision or 'main'} ({detail}).",
            field="weights",
        )
    if isinstance(exc, httpx.HTTPError | OSError):
        return JobError("weights_unavailable", f"{what}: Hugging Face cannot be reached ({detail}).", field="weights")
    return _download_failed(entry, f"{type(exc).__name__}: {detail}")


def _hf_progress_class(report: Callable[[int, int | None], None], check: Callable[[], None]) -> type:
    """A tqdm class for hf_hub_download that draws nothing, reports bytes and stops on cancel."""
    from tqdm import tqdm

    class _Progress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            check()
            self._done += int(n or 0)
            report(self._done, self._total)
            return None

    return _Progress


# -- files -------------------------------------------------------------------------------


def _with_defaults(entries: Iterable[WeightsEntry]) -> dict[Key, WeightsEntry]:
    table = {(t, "default"): WeightsEntry(name="default", type=t, url=DEFAULT_WEIGHT_URLS[t]) for t in MODEL_TYPES}
    table.update({_key(entry): entry for entry in entries})
    return table


def _key(entry: WeightsEntry) -> Key:
    return (entry.type, entry.name)


def _identity(entry: WeightsEntry | None) -> tuple[str, str | None, str | None] | None:
    return None if entry is None else (entry.source, entry.sha256, entry.config)


def _as_url(entry: WeightsEntry) -> str:
    return entry.url if entry.url is not None else Path(entry.source).resolve().as_uri()


def _verified_sha(entry: WeightsEntry, target: Path) -> str | None:
    """The sha256 recorded for a complete download of exactly this URL (and this sha256, if set)."""
    size = _size(target)
    record = _read_json(_sibling(target, ".json"))
    sha = record.get("sha256")
    if size is None or record.get("url") != entry.url or record.get("size") != size or not isinstance(sha, str):
        return None
    if entry.sha256 is not None and sha != entry.sha256:
        return None  # the config now expects other bytes: fetch (and verify) again
    return sha


def _part_progress(target: Path) -> tuple[int, int | None]:
    total = _read_json(_sibling(target, ".part.json")).get("total")
    return _size(_sibling(target, ".part")) or 0, total if isinstance(total, int) else None


@contextmanager
def _exclusive(lock_path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold ``lock_path``'s flock; call ``waiting`` between tries while another process holds it.

    flock dies with its process, so a crashed downloader never leaves the file locked.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while not _try_flock(fd, fcntl.LOCK_EX):
            waiting()
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _held_elsewhere(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes START-END/TOTAL``; total None for ``*``."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if match is None:
        return None, None
    return int(match[1]), int(match[2]) if match[2] != "*" else None


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256_prefix(path: Path, length: int) -> Any:
    """A sha256 already fed with the first ``length`` bytes of ``path`` (a resumed download)."""
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as handle:
            remaining = length
            while remaining and (chunk := handle.read(min(CHUNK_BYTES, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
    return digest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, body: dict[str, Any]) -> None:
    """Write aside, fsync, rename: a reader never sees half a record."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide records and cancel requests from other users
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
