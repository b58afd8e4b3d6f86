"""Everything samwatch writes: results, progress, errors, status; always atomically.

Each file is written to a hidden temporary name in its final folder, fsync'd, then renamed
into place (and the folder fsync'd), so a reader on a share never sees half a file and a
crash leaves either the old file or the new one. Temporary names start with ``.samwatch-``
so a restart can sweep the ones a killed process left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import orjson

TMP_PREFIX = ".samwatch-"
STATE_FOLDER = "_samwatch"
#: Files that belong to a result and live and die with it (see samwatch/outputs/).
PREVIEW_SUFFIX = ".preview.png"
LABELS_SUFFIX = ".labels.tif"
LABELS_CSV_SUFFIX = ".labels.csv"
EXTRA_SUFFIXES = (PREVIEW_SUFFIX, LABELS_SUFFIX, LABELS_CSV_SUFFIX)
#: Writes one file's content to an open, seekable binary handle.
Writer = Callable[[BinaryIO], None]


def _process_umask() -> int:
    try:  # read, not os.umask(): setting it to read it would race with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


_NEW_FILE_MODE = 0o666 & ~_process_umask()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some network file systems refuse to open folders; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_file(path: Path, write: Writer, *, durable: bool = True, mode: int | None = None) -> Path:
    """Write a hidden temporary beside ``path`` (fsync'd if durable); the caller renames it.

    ``mode`` defaults to what a plain ``open`` would give (0666 less the umask): mkstemp's 0600
    would hide results from the people on the share.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _NEW_FILE_MODE if mode is None else mode)
        os.close(fd)  # reopened by name: writers such as tifffile want a handle with a file name
        with open(tmp_name, "r+b") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def atomic_write_bytes(
    path: Path,
    data: bytes,
    *,
    durable: bool = True,
    mode: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    ``check`` is called on the written temporary before the rename; if it raises, ``path``
    is untouched.
    """
    tmp = stage_file(path, lambda handle: handle.write(data), durable=durable, mode=mode)
    try:
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any, *, durable: bool = True) -> None:
    # orjson: a result of 10⁶ vertices encodes ~10x faster than with json (bench/bench_speed.py).
    data = orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    atomic_write_bytes(path, data, durable=durable)


def sweep_temporaries(root: Path) -> int:
    """Remove temporaries a killed process left behind; returns how many."""
    removed = 0
    if not root.is_dir():
        return 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.startswith(TMP_PREFIX):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


@dataclass(frozen=True)
class JobOutputs:
    """The outbox files of one job, mirroring its inbox path (``exp1/img001.cells``)."""

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

    def write_progress(self, state: str, stage: str, percent: float, message: str = "", **extra: Any) -> None:
        # Progress is advisory and frequent: atomic, but not fsync'd each time.
        payload = {
            "state": state,
            "stage": stage,
            "percent": int(max(0, min(100, round(percent)))),
            "message": message,
            "updated": now_iso(),
            **extra,
        }
        atomic_write_json(self.progress, payload, durable=state in ("done", "failed", "cancelled"))

    @property
    def extras(self) -> tuple[Path, ...]:
        return tuple(self._path(suffix) for suffix in EXTRA_SUFFIXES)

    def write_result(self, collection: dict[str, Any], extras: Mapping[str, Writer] | None = None) -> None:
        """The result and its extra files (suffix -> writer): all are written aside first, then
        renamed into place, the GeoJSON last, so whoever sees a result finds its extras; an
        extra this result lacks (an older version's preview) is removed."""
        extras = extras or {}
        unknown = set(extras) - set(EXTRA_SUFFIXES)
        if unknown:
            raise ValueError(f"not a result extra: {sorted(unknown)}")
        staged: list[tuple[Path, Path]] = []
        try:
            for suffix, write in extras.items():
                staged.append((stage_file(self._path(suffix), write), self._path(suffix)))
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for suffix in EXTRA_SUFFIXES:
            if suffix not in extras:
                self._path(suffix).unlink(missing_ok=True)
        atomic_write_json(self.result, collection)
        self.error.unlink(missing_ok=True)

    def write_error(self, body: dict[str, Any]) -> None:
        # One outcome per content version: a stale result of an earlier version goes, extras
        # after it (a reader that sees no result expects no extras).
        atomic_write_json(self.error, {**body, "updated": now_iso()})
        for path in (self.result, *self.extras):
            path.unlink(missing_ok=True)

    def remove_all(self) -> None:
        for path in (self.result, *self.extras, self.progress, self.error):
            path.unlink(missing_ok=True)
