"""Atomic file writes: what every file samwatch writes goes through.

Each file is written to a hidden temporary name in its final folder, fsync'd, then renamed
into place (and the folder fsync'd), so a reader on a share never sees half a file and a
crash leaves either the old file or the new one. Temporary names start with ``.samwatch-``
so a restart can sweep the ones a killed process left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from samwatch import faults

TMP_PREFIX = ".samwatch-"


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


def stage_bytes(path: Path, data: bytes, *, durable: bool = True, mode: int | None = None) -> Path:
    """``data`` in a hidden temporary beside ``path`` (fsync'd if durable); the caller renames it.

    ``mode`` defaults to what a plain ``open`` would give (0666 less the umask): mkstemp's 0600
    would hide results from the people on the share.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _NEW_FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            if faults.armed():  # the crash sweep stops here with the temporary empty, half and fully written
                _write_in_halves(handle, data, str(path))
            else:
                handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        faults.hit("write 100%", str(path))
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)


def _write_in_halves(handle: Any, data: bytes, subject: str) -> None:
    faults.hit("write 0%", subject)
    handle.write(data[: len(data) // 2])
    handle.flush()
    faults.hit("write 50%", subject)
    handle.write(data[len(data) // 2 :])


def atomic_write_bytes(
    path: Path,
    data: bytes,
    *,
    durable: bool = True,
    sync_folder: bool = True,
    mode: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file.

    ``check`` is called on the written temporary before the rename; if it raises, ``path``
    is untouched.
    """
    tmp = stage_bytes(path, data, durable=durable, mode=mode)
    try:
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable and sync_folder:  # False: the caller syncs the folder once after several renames
        fsync_dir(path.parent)


def encode_json(payload: Any) -> bytes:
    # orjson: a result of 10⁶ vertices encodes ~10x faster than with json (bench/bench_speed.py);
    # numpy rings (geometry.outline ``arrays``) are written without a Python object per vertex.
    return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def encoded_now(payload: Any) -> orjson.Fragment:
    """``payload`` encoded on this thread, written later as is by ``atomic_write_json`` (also
    inside a larger document): a job's result is encoded on its worker thread, so the
    daemon's loop only writes the bytes."""
    return orjson.Fragment(encode_json(payload))


def atomic_write_json(path: Path, payload: Any, *, durable: bool = True, sync_folder: bool = True) -> None:
    atomic_write_bytes(path, encode_json(payload), durable=durable, sync_folder=sync_folder)


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
