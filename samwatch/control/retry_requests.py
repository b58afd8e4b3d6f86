"""``samwatch retry``: requests the CLI leaves in ``outbox/_samwatch/requests/`` for the daemon.

The outbox, not the state folder, so that a person who sees only the share can ask too (as
``samwatch status --outbox`` reads from there). Each request is one small JSON file, written
atomically; the daemon takes (reads and deletes) them on its next pass.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from samwatch.control.ledger import JobRow
from samwatch.atomic import atomic_write_json, now_iso

REQUESTS_FOLDER = "requests"
_PREFIX = "retry-"


@dataclass(frozen=True)
class RetryRequest:
    """Run again the failed jobs (``failed``), or the jobs of these inbox-relative paths."""

    paths: tuple[str, ...] = ()
    failed: bool = False

    def matches(self, row: JobRow) -> bool:
        if self.failed and row.state == "failed":
            return True
        names = [name for name in (row.job_id, row.sidecar, row.image) if name]
        for wanted in self.paths:
            wanted = posixpath.normpath(wanted).strip("/")
            if wanted in (".", ""):
                return True  # the whole inbox
            if any(name == wanted or name.startswith(wanted + "/") for name in names):
                return True
        return False


def request_retry(state_folder: Path, request: RetryRequest) -> Path:
    path = state_folder / REQUESTS_FOLDER / f"{_PREFIX}{time.time_ns()}-{os.getpid()}.json"
    atomic_write_json(path, {"paths": list(request.paths), "failed": request.failed, "requested": now_iso()})
    return path


def take_retry_requests(state_folder: Path) -> list[RetryRequest]:
    """The requests waiting in the outbox, oldest first; each is deleted once read."""
    folder = state_folder / REQUESTS_FOLDER
    try:
        names = sorted(name for name in os.listdir(folder) if name.startswith(_PREFIX) and name.endswith(".json"))
    except FileNotFoundError:
        return []
    requests = []
    for name in names:
        path = folder / name
        try:
            body = json.loads(path.read_bytes())
            path.unlink()
        except FileNotFoundError:
            continue  # another daemon on this share took it
        except (OSError, ValueError) as exc:
            logger.warning(f"retry request {path} unreadable, removed: {exc}")
            path.unlink(missing_ok=True)
            continue
        paths = body.get("paths") if isinstance(body, dict) else None
        if isinstance(paths, list) and all(isinstance(p, str) for p in paths):
            requests.append(RetryRequest(tuple(paths), bool(body.get("failed"))))
        else:
            logger.warning(f"retry request {path} is not a samwatch retry request; ignored")
    return requests
