"""Between processes: a flock per file being downloaded, and the cancel-request file.

flock dies with its process, so a crashed downloader never leaves a file locked. The CLI asks
every process to stop downloading by writing ``state_dir/weights/cancel`` (samapi's cancel file).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from samwatch.errors import JobError
from samwatch.atomic import now_iso
from samwatch.weights.files import write_json


def cancel_file_path(state_dir: Path) -> Path:
    return Path(state_dir) / "weights" / "cancel"


def request_cancel(state_dir: Path, model_type: str | None = None, name: str | None = None) -> Path:
    """Ask every process downloading (matching) weights under ``state_dir`` to stop."""
    path = cancel_file_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {key: value for key, value in (("type", model_type), ("name", name)) if value is not None}
    write_json(path, body | {"requested": now_iso()})
    return path



@dataclass(frozen=True)
class CancelCheck:
    """Raises ``weights_download_cancelled`` once this download is cancelled, here or by the cancel file."""

    event: threading.Event
    cancel_file: Path
    model_type: str
    name: str
    since_ns: int  # wall clock at the download's start: older cancel requests were for others

    def __call__(self) -> None:
        if self.event.is_set() or self._requested_by_file():
            raise JobError(
                "weights_download_cancelled",
                f"The download of the {self.model_type} weights {self.name!r} was cancelled (samwatch weights "
                f"cancel, a config change or shutdown). Start it again with `samwatch weights fetch {self.name} "
                f"--type {self.model_type}`: the jobs that waited for it then run again by themselves.",
                field="weights",
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


@contextmanager
def exclusive(lock_path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold ``lock_path``'s flock; call ``waiting`` between tries while another process holds it.

    flock dies with its process, so a crashed downloader never leaves the file locked.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while not try_flock(fd, fcntl.LOCK_EX):
            waiting()
        yield
    finally:
        os.close(fd)


def try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def held_elsewhere(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
