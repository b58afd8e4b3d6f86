"""Logging: loguru to stderr, one line per event, one format for the daemon and every command.

journald adds its own timestamps, so under systemd lines start with the level. Python warnings
become log lines in the same format, except a few that model libraries print at every import and
that no user can act on (they are filtered by message, so any other warning still shows).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from loguru import logger

#: (category, message regex) of import-time noise from the model packages samwatch pins.
_KNOWN_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"Importing from timm\.models\.(layers|registry) is deprecated"),
    (UserWarning, r"Overwriting tiny_vit_\w+ in registry with mobile_sam\."),
)


def setup_logging(level: str = "INFO") -> None:
    logger.remove()
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "{level: <7} {message}" if under_journald else "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
    logger.add(sys.stderr, level=level, format=fmt, backtrace=False, diagnose=False)
    for category, message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
    logger.warning(f"{category.__name__}: {message} ({filename}:{lineno})")
