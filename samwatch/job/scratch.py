"""A job's private scratch folder (video frames for a tracker), and what killed runs left.

A daemon stopped by kill -9, the OOM killer or a power cut mid-job never runs its
``TemporaryDirectory`` cleanup, and a tracker's frames can be gigabytes; a service that runs
for months must not fill the temporary folder one crash at a time. Each folder is named
after the process that made it, so the first job of a later process removes the folders of
processes that are gone (on this host: a Dask worker's share of /tmp is its own).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from samwatch.processes import process_gone

PREFIX = "samwatch-job-"


@contextmanager
def job_scratch(root: Path | None = None) -> Iterator[Path]:
    """A fresh folder under ``root`` (the system's temporary folder), removed when the job ends."""
    root = Path(root or tempfile.gettempdir())
    remove_abandoned(root)
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=root) as folder:
        yield Path(folder)


@functools.cache
def remove_abandoned(root: Path) -> int:
    """Removes the scratch folders under ``root`` of processes no longer running (once per process)."""
    removed = 0
    for folder in root.glob(f"{PREFIX}*"):
        pid = _owner(folder.name)
        if pid is None or pid == os.getpid() or not process_gone(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += not folder.exists()
    if removed:
        logger.info(f"removed {removed} job scratch folders left by stopped samwatch processes under {root}")
    return removed


def _owner(name: str) -> int | None:
    pid = name[len(PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None
