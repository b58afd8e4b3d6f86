"""HTTP(S) and file:// downloads: streamed to ``.part``, hashed on the way, resumed with Range."""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.atomic import fsync_dir, now_iso
from samwatch.weights.failures import checksum_mismatch, download_failed, http_error
from samwatch.weights.files import CHUNK_BYTES, part_progress, read_json, sha256_prefix, sibling, write_json

_TIMEOUT_SECONDS = 60.0
_PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Transfer:
    """One attempt at getting one URL entry's file into place; runs with the file lock held."""

    entry: WeightsEntry
    target: Path
    report: Callable[[int, int | None], None]
    check: Callable[[], None]

    @property
    def part(self) -> Path:
        return sibling(self.target, ".part")

    @property
    def part_info(self) -> Path:
        return sibling(self.target, ".part.json")

    def http(self, opener: urllib.request.OpenerDirector) -> str:
        offset, validator = self._resume_point()
        response = self._open(opener, offset, validator)
        with response:
            offset, total, validator = self._accept(response, offset, validator)
            write_json(self.part_info, {"url": self.entry.url, "validator": validator, "total": total})
            try:
                digest, done = self._stream(response, offset, total)
                if total is not None and done != total:
                    raise download_failed(self.entry, f"the connection closed after {done} of {total} bytes")
            except JobError as error:
                # a resumable .part is worth keeping for the retry; anything else starts clean
                if error.code == "weights_download_cancelled" or validator is None:
                    self.discard()
                raise
        sha = digest.hexdigest()
        if self.entry.sha256 is not None and sha != self.entry.sha256:
            self.discard()
            raise checksum_mismatch(self.entry, sha, f"The file downloaded from {self.entry.url}", "deleted")
        self.install(self.part, sha)
        return sha

    def progress_elsewhere(self) -> tuple[int, int | None]:
        return part_progress(self.target)

    def _resume_point(self) -> tuple[int, str | None]:
        """Where a leftover .part (a dead process's, or a broken connection's) may resume.

        Only with a validator (ETag/Last-Modified) recorded for the same URL: the server then
        sends the rest only if the file is unchanged (If-Range), else the whole file again.
        """
        if not self.part.exists():
            return 0, None
        info = read_json(self.part_info)
        validator = info.get("validator") if info.get("url") == self.entry.url else None
        if not isinstance(validator, str) or validator.startswith("W/"):
            self.discard()
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
                self.discard()
                return self._open(opener, 0, None)
            raise http_error(self.entry, exc.code, exc.reason) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise download_failed(self.entry, f"cannot reach the server ({reason})") from None

    def _accept(self, response: Any, offset: int, validator: str | None) -> tuple[int, int | None, str | None]:
        """(offset, total, validator) of what the server actually sends."""
        status = response.status or 200  # file:// responses carry no status
        headers = response.headers
        if offset and status == 206:
            start, total = content_range(headers.get("Content-Range"))
            if start == offset:
                return offset, total, validator
            self.discard()
            raise download_failed(self.entry, "the server answered the resume request with another range")
        length = headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        return 0, total, headers.get("ETag") or headers.get("Last-Modified")

    def _stream(self, response: Any, offset: int, total: int | None) -> tuple[Any, int]:
        digest = sha256_prefix(self.part, offset)
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
            raise download_failed(self.entry, f"the connection broke ({exc or type(exc).__name__})") from None

    def install(self, source: Path, sha: str) -> None:
        # the record first: a crash before the rename leaves a record without a file, i.e. not on disk
        record = {"url": self.entry.url, "sha256": sha, "size": source.stat().st_size, "fetched": now_iso()}
        write_json(sibling(self.target, ".json"), record)
        self.part_info.unlink(missing_ok=True)  # housekeeping done before the file becomes visible
        os.replace(source, self.target)
        fsync_dir(self.target.parent)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.part_info.unlink(missing_ok=True)


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes START-END/TOTAL``; total None for ``*``."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if match is None:
        return None, None
    return int(match[1]), int(match[2]) if match[2] != "*" else None


def probe_http(entry: WeightsEntry, opener: urllib.request.OpenerDirector) -> JobError | None:
    """Whether the URL answers now (a HEAD request; file:// is opened): None, or why not."""
    request = urllib.request.Request(entry.url or "", method="HEAD", headers={"User-Agent": "samwatch"})
    try:
        opener.open(request, timeout=_PROBE_TIMEOUT_SECONDS).close()
    except urllib.error.HTTPError as exc:
        exc.close()
        return None if exc.code == 405 else http_error(entry, exc.code, exc.reason)  # 405: no HEAD, GET may work
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return download_failed(entry, f"cannot reach the server ({getattr(exc, 'reason', None) or exc})")
    return None
