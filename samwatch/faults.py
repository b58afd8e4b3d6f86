"""Fault injection: named instants of a job's life where the crash sweep stops the daemon.

Off by default, and then ``hit`` is one test of a module global. A test arms a handler
(``arm``), or a subprocess daemon reads ``SAMWATCH_FAULT`` at import: ``INSTANT@SUBJECT=ACTION``
(``@SUBJECT`` optional, matched as a substring of the subject), where ACTION is ``kill``
(SIGKILL itself), ``term`` (SIGTERM itself) or ``enospc`` (that write fails, disk full); each
fires once. The instants, in the order a job meets them (tests/test_crash_sweep.py):

- ``queued``: the job is about to be dispatched (subject: the job)
- a stage as its progress reports it (``reading``, ``loading model``, ``encoding image``,
  ``decoding prompts``, ``writing``), on the thread doing it (subject: the job)
- ``result encoded``: the slot's writing thread encoded the result (subject: the job)
- ``write 0%`` / ``write 50%`` / ``write 100%``: a file's temporary holds that much of its bytes,
  not yet renamed (subject: the file's final path)
- ``renamed``: every outcome file is renamed into place and synced, the ledger not yet told
- ``recorded``: the ledger holds the outcome (subject: the job)
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable

Handler = Callable[[str, str], None]

ENV = "SAMWATCH_FAULT"
_handler: Handler | None = None


def hit(instant: str, subject: str = "") -> None:
    """The process is at ``instant`` (of ``subject``): an armed handler may stop it here."""
    if _handler is not None:
        _handler(instant, subject)


def armed() -> bool:
    return _handler is not None


def arm(handler: Handler | None) -> None:
    """``handler(instant, subject)`` at every instant from now on; None: off again."""
    global _handler
    _handler = handler


def from_spec(spec: str) -> Handler:
    """The handler of a ``SAMWATCH_FAULT`` value (see above)."""
    target, _, action = spec.rpartition("=")
    instant, _, subject = target.partition("@")
    if action not in ("kill", "term", "enospc") or not instant:
        raise ValueError(f"{ENV}={spec!r}: expected INSTANT[@SUBJECT]=kill|term|enospc")
    fired = False

    def handler(at: str, of: str) -> None:
        nonlocal fired
        if fired or at != instant or subject not in of:
            return
        fired = True
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), of)
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)

    return handler


if os.environ.get(ENV):
    arm(from_spec(os.environ[ENV]))
