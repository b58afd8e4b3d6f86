"""Whether a process that left something behind (a claim, a scratch folder) still runs."""

from __future__ import annotations

import os


def process_gone(pid: int) -> bool:
    """True only when no process has ``pid`` on this host (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
