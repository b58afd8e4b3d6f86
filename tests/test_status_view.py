"""``samwatch status``: a table with progress bars on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from samwatch.atomic import now_iso
from samwatch.cli.status_view import print_status

STATUS = {
    "state": "running", "version": "0.1.0", "instance": "gpu-1", "pid": 42, "updated": now_iso(),
    "heartbeat_seconds": 5, "device": "cuda:0", "queue": {"queued": 3, "waiting": 0},
    "current": {"job": "exp1/[red]img001", "stage": "automask", "percent": 50, "seconds": 4.2},
    "loaded_models": [{"type": "vit_t", "weights": "default"}], "downloads": [],
    "recent_failures": [{"job": "exp2/b", "error": "image_unreadable", "message": "truncated", "at": "2026-01-01"}],
    "config": {"error": None},
}


def test_a_terminal_gets_tables_with_progress_bars() -> None:
    out = io.StringIO()
    print_status(STATUS, 1.0, False, [], stream=out, terminal=True)
    text = out.getvalue()
    assert "exp1/[red]img001" in text, "names are text, not rich markup"
    assert "━" in text and "\x1b[" in text  # a drawn bar, in colour
    assert "image_unreadable" in text and "vit_t/default" in text


@pytest.mark.subprocess
def test_a_pipe_gets_plain_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    print_status(STATUS, 1.0, False, [], stream=out)
    text = out.getvalue()
    assert "running: exp1/[red]img001 automask 50% (4.2 s)" in text and "\x1b[" not in text
    outbox = tmp_path / "outbox" / "_samwatch"
    outbox.mkdir(parents=True)
    # fresh, and with a long beat: a busy machine's slow start must not make it stale
    (outbox / "status.json").write_text(json.dumps({**STATUS, "updated": now_iso(), "heartbeat_seconds": 60}))
    (tmp_path / "config.yaml").write_text(f"outbox: {tmp_path / 'outbox'}\ninbox: {tmp_path / 'inbox'}\n")
    done = subprocess.run([sys.executable, "-m", "samwatch", "status", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "queue: 3 queued" in done.stdout and "\x1b[" not in done.stdout
    as_json = subprocess.run([sys.executable, "-m", "samwatch", "status", "--json", "--config",
                              str(tmp_path / "config.yaml")], capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["current"] == STATUS["current"]
