"""The local executor: one slot per device, several jobs in flight in one daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import (
    DaemonProcess, InProcessDaemon, fake_weights, progress_state, read_json, save_image, wait_for, write_config,
    write_sidecar,
)
from test_service import SMALL


def test_two_cpu_slots_run_two_jobs_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path), device=["cpu", "cpu"])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = InProcessDaemon(config, threaded=True)
    for stem in ("one", "two"):
        save_image(inbox / f"{stem}.png", SMALL)
        write_sidecar(inbox / f"{stem}.yaml", {"label": "slow:3", "prompts": [{"bbox": [1, 1, 9, 9]}]})

    def both_running() -> bool:
        status = read_json(outbox / "_samwatch" / "status.json") or {}
        running = {job["job"] for job in status.get("running", [])}
        return running == {"one", "two"} and all(progress_state(outbox, s) == "running" for s in ("one", "two"))

    daemon.run_until(both_running, 30, what="both jobs running at the same time")
    wait_for(both_running, 30, what="both jobs running at the same time")
    status = read_json(outbox / "_samwatch" / "status.json")
    assert status["executor"] == {"kind": "local", "slots": 2}
    assert sorted(worker["job"] for worker in status["workers"]) == ["one", "two"]
    assert {job["worker"] for job in status["running"]} == {"local-0", "local-1"}
    daemon.run_until(lambda: all(progress_state(outbox, s) == "done" for s in ("one", "two")), 30, what="both done")
    counted = daemon.run_until(lambda: [w["done"] for w in read_json(outbox / "_samwatch" / "status.json")["workers"]
                                        if w.get("done")], 10, what="per-slot done counts")
    assert counted == [1, 1]
    ran_on = {read_json(outbox / f"{s}.geojson")["samwatch"]["worker"]["name"] for s in ("one", "two")}
    assert ran_on == {"local-0", "local-1"}
    daemon.close()
    stopped = read_json(outbox / "_samwatch" / "status.json")
    assert stopped["state"] == "stopped" and stopped["workers"] == []


@pytest.mark.subprocess  # SIGTERM to a real process
def test_after_sigterm_the_interrupted_job_reads_queued_and_the_daemon_stopped(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    save_image(inbox / "long.png", SMALL)
    write_sidecar(inbox / "long.yaml", {"label": "slow:60", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: (read_json(outbox / "long.progress.json") or {}).get("percent", 0) > 40, 30, what="job under way")
    assert daemon.stop() == 0  # --grace 5: interrupted, queued again
    progress = read_json(outbox / "long.progress.json")
    assert progress["state"] == "queued" and "runs again" in progress["message"], progress
    assert read_json(outbox / "_samwatch" / "status.json")["state"] == "stopped"
    shown = subprocess.run([sys.executable, "-m", "samwatch", "status", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert "state: stopped" in shown.stdout and "STALE" not in shown.stdout, shown.stdout
