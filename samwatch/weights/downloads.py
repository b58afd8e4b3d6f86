"""One weights download on its own thread: fetch it (http or hf) under its file's flock, verify it.

The registry starts a :class:`Download` per file and holds its :class:`DownloadState` under its
lock; a :class:`Fetcher` runs the transfer and tells the registry through ``report`` and ``finish``.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.weights.failures import download_failed, naming_config
from samwatch.weights.files import sibling, verified_sha
from samwatch.weights.hf import fetch_hf, parse_hf_url
from samwatch.weights.http import Transfer
from samwatch.weights.locks import CancelCheck, cancel_file_path, exclusive

POLL_SECONDS = 0.25


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
class Download:
    entry: WeightsEntry
    target: Path
    state: DownloadState  # replaced (never mutated) under the registry lock
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class Fetcher:
    """What every download of one registry shares: where files go, how to reach the network, and
    the registry's callbacks (``report(download, done, total, elsewhere)``, ``finish(download, error)``)."""

    state_dir: Path
    opener: urllib.request.OpenerDirector
    config_file: Path | None
    report: Callable[..., None]
    finish: Callable[[Download, JobError | None], None]

    def run(self, download: Download) -> None:
        entry = download.entry
        check = CancelCheck(
            download.cancel, cancel_file_path(self.state_dir), entry.type, entry.name, time.time_ns()
        )
        try:
            sha = self._obtain(download, check)
        # The reason is logged once, by whoever receives the error: each waiting job's summary
        # line, or the CLI's fetch; here only the event.
        except JobError as error:
            logger.info("weights {}/{}: download stopped ({})", entry.type, entry.name, error.code)
            self.finish(download, naming_config(error, entry, self.config_file))
        except OSError as exc:  # network errors are JobErrors by now: this is the local disk
            reason = f"cannot write into {download.target.parent} ({exc.strerror or exc})"
            logger.info("weights {}/{}: download stopped (local disk)", entry.type, entry.name)
            self.finish(download, download_failed(entry, reason, self.config_file))
        except Exception as exc:  # a bug must fail the waiting jobs, not leave them waiting forever
            logger.exception("weights {}/{}: the download crashed", entry.type, entry.name)
            self.finish(download, download_failed(entry, f"{type(exc).__name__}: {exc}"))
        else:
            logger.info("weights {}/{}: ready, sha256 {}", entry.type, entry.name, sha)
            self.finish(download, None)

    def _obtain(self, download: Download, check: CancelCheck) -> str:
        entry, target = download.entry, download.target
        target.parent.mkdir(parents=True, exist_ok=True)
        transfer = Transfer(entry, target, partial(self.report, download), check)
        with exclusive(sibling(target, ".lock"), partial(self._wait_elsewhere, download, transfer)):
            sha = verified_sha(entry, target)
            if sha is not None:
                return sha  # another process fetched it while this one waited for the lock
            try:
                ref = parse_hf_url(entry.url or "")
            except ValueError as exc:
                raise download_failed(entry, str(exc)) from None
            if ref is not None:
                return fetch_hf(transfer, ref, self.state_dir / "weights" / "hf" / target.name)
            return transfer.http(self.opener)

    def _wait_elsewhere(self, download: Download, transfer: Transfer) -> None:
        transfer.check()
        if not download.state.elsewhere:
            logger.info(
                "weights {}/{}: another process is downloading {}; waiting for it",
                download.entry.type,
                download.entry.name,
                download.target.name,
            )
        done, total = transfer.progress_elsewhere()
        self.report(download, done, total, elsewhere=True)
        download.cancel.wait(POLL_SECONDS)
