"""Logging: loguru to stderr, one line per event; journald adds its own timestamps."""

from __future__ import annotations

import os
import sys

from loguru import logger


def setup_logging(level: str = "INFO") -> None:
    logger.remove()
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "{level: <7} {message}" if under_journald else "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
    logger.add(sys.stderr, level=level, format=fmt, backtrace=False, diagnose=False)
