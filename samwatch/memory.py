"""The process's memory: what it holds now, its peak over a stretch of work, and giving back.

A daemon runs for months beside other programs, so after a job that grew it, it hands back what
the job used: Python's garbage is collected and glibc is asked to return free heap pages to the
system (``malloc_trim``; freed memory otherwise stays in the process, where RSS keeps a job's peak).
A job that grew the process by less than ``GIVE_BACK_MIN_BYTES`` is not worth it: a full collection
walks every object the process holds (about 0.25 s once torch and the model libraries are loaded),
longer than a job on a cached embedding takes. The peak of a job is the kernel's high-water mark
(VmHWM), reset when the job starts (Linux); elsewhere only the RSS at its end is known.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache
from pathlib import Path

import psutil

MiB = 1 << 20
#: growth over a job's starting RSS below which it has too little to give back to be worth a collection
GIVE_BACK_MIN_BYTES = 64 * MiB
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


@cache
def _malloc_trim():  # the C function, or None where the C library is not glibc
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def give_back() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc; a no-op elsewhere)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PeakMeter:
    """The process's peak RSS between ``start`` and ``peak``: the kernel's VmHWM reset at start
    (Linux), else the RSS when asked. The mark is the process's: with several device slots a
    meter sees the peak since any slot's latest start."""

    def start(self) -> int:
        """Reset the mark; the RSS it starts from."""
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        return rss_bytes()

    def worth_giving_back(self, started_at: int) -> bool:
        """Whether the process grew by ``GIVE_BACK_MIN_BYTES`` since a job started at RSS ``started_at``.

        Memory freed but kept by the C heap still counts in the RSS, and the RSS never exceeds the
        mark (a later job's reset sets the mark to the RSS of that moment), so below this growth
        there is little for ``give_back`` to return."""
        return self.peak() - started_at >= GIVE_BACK_MIN_BYTES

    def peak(self) -> int:
        try:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss_bytes()
