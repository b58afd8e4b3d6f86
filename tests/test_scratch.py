"""A job's scratch folder: removed when the job ends, and when a killed process left it, by the next one."""

from __future__ import annotations

import os
from pathlib import Path

from crash_rig import dead_pid
from samwatch.job.scratch import PREFIX, job_scratch


def test_a_killed_process_s_scratch_is_removed_by_the_next_job_and_nothing_else(tmp_path: Path) -> None:
    killed = tmp_path / f"{PREFIX}{dead_pid()}-abc123"
    (killed / "frames").mkdir(parents=True)
    (killed / "frames" / "00000.jpg").write_bytes(b"\xff" * 1000)
    running = tmp_path / f"{PREFIX}{os.getppid()}-def456"  # a live process (our parent): still in use
    running.mkdir()
    unrelated = tmp_path / "samwatch-jobs-of-someone"
    unrelated.mkdir()
    with job_scratch(tmp_path) as scratch:
        assert scratch.is_dir() and scratch.name.startswith(f"{PREFIX}{os.getpid()}-")
        (scratch / "frame.jpg").write_bytes(b"x")
        assert not killed.exists()
        assert running.is_dir() and unrelated.is_dir()
    assert not scratch.exists()
    assert {p.name for p in tmp_path.iterdir()} == {running.name, unrelated.name}
