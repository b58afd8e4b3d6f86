"""The unattended service: crashes, bursts, several daemons, live reload.

These drive the real daemon process with the fake model family (tests/fakes.py), so
hundreds of jobs run in CI time while everything but the network forward pass is real.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from support import DaemonProcess, fake_weights, finished, progress_state, read_json, save_image, wait_for, write_config, write_sidecar

pytestmark = pytest.mark.subprocess  # each test starts a real samwatch process

SMALL = np.full((48, 64), 120, np.uint8)


def drop_jobs(inbox: Path, count: int, folder: str = "burst", label: str | None = None) -> list[str]:
    stems = []
    for index in range(count):
        stem = f"{folder}/j{index:04d}"
        save_image(inbox / f"{stem}.png", SMALL)
        body = {"prompts": [{"bbox": [1, 1, 10 + index % 40, 20]}]}
        if label:
            body["label"] = label
        write_sidecar(inbox / f"{stem}.yaml", body)
        stems.append(stem)
    return stems


def done_counts(logs: list[str], stems: list[str]) -> dict[str, int]:
    text = "\n".join(logs)
    return {stem: text.count(f"job {stem} done ") for stem in stems}


def test_kill_9_at_random_moments_keeps_exactly_one_outcome(tmp_path: Path) -> None:
    rng = random.Random(1234)
    config = write_config(tmp_path, fake_weights(tmp_path))
    outbox = tmp_path / "outbox"
    stems = drop_jobs(tmp_path / "inbox", 40, label="slow:0.15")
    logs = []
    kills = 0
    while not all(finished(outbox, s) for s in stems) and kills < 6:
        daemon = DaemonProcess(config, fake_model=True)
        time.sleep(rng.uniform(1.5, 4.0))  # a random moment: reading, running, or writing outputs
        daemon.kill()
        kills += 1
        logs.append(daemon.log())
    final = DaemonProcess(config, fake_model=True)
    wait_for(lambda: "started" in final.log(), 60, what="the last daemon up")  # SIGTERM now stops it cleanly
    wait_for(lambda: all(finished(outbox, s) for s in stems), 120, what="every job finished")
    assert final.stop() == 0
    logs.append(final.log())
    counts = done_counts(logs, stems)
    for stem in stems:
        assert read_json(outbox / f"{stem}.progress.json")["state"] == "done", stem
        result = read_json(outbox / f"{stem}.geojson")
        assert result is not None and len(result["features"]) == 1, stem
        assert not (outbox / f"{stem}.error.json").exists()
        assert counts[stem] >= 1
    # A job is only redone when a kill interrupted it before its outcome was recorded.
    assert sum(count - 1 for count in counts.values()) <= kills
    assert list(outbox.rglob(".samwatch-*")) == []


def test_burst_of_1000_jobs_none_lost_or_doubled_memory_bounded(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    warm = drop_jobs(inbox, 20, folder="warm")
    wait_for(lambda: all(finished(outbox, s) for s in warm), 120, what="warm-up jobs")
    process = psutil.Process(daemon.proc.pid)
    rss_before = process.memory_info().rss
    started = time.monotonic()
    stems = drop_jobs(inbox, 1000)
    wait_for(lambda: all(finished(outbox, s) for s in stems), 600, what="1000 jobs", interval=0.5)
    elapsed = time.monotonic() - started
    rss_after = process.memory_info().rss
    assert daemon.stop() == 0
    counts = done_counts([daemon.log()], stems)
    assert set(counts.values()) == {1}, {s: c for s, c in counts.items() if c != 1}
    growth = (rss_after - rss_before) / 1e6
    print(f"1000 jobs in {elapsed:.1f} s ({1000 / elapsed:.1f} jobs/s); RSS {rss_before / 1e6:.0f} -> {rss_after / 1e6:.0f} MB")
    assert growth < 60, f"RSS grew {growth:.0f} MB over 1000 jobs"


def test_two_daemons_on_one_share_split_the_work(tmp_path: Path) -> None:
    weights = fake_weights(tmp_path)
    config_a = write_config(tmp_path, weights, state_dir=str(tmp_path / "state-a"), service={"instance": "a", "heartbeat_seconds": 0.5})
    config_b = tmp_path / "config-b.yaml"
    data = yaml.safe_load(config_a.read_text())
    data.update(state_dir=str(tmp_path / "state-b"), service={"instance": "b", "heartbeat_seconds": 0.5})
    config_b.write_text(yaml.safe_dump(data))
    stems = drop_jobs(tmp_path / "inbox", 60, label="slow:0.1")
    one = DaemonProcess(config_a, fake_model=True)
    two = DaemonProcess(config_b, fake_model=True)
    outbox = tmp_path / "outbox"
    wait_for(lambda: all(finished(outbox, s) for s in stems), 180, what="all jobs")
    assert one.stop() == 0 and two.stop() == 0
    counts_one = done_counts([one.log()], stems)
    counts_two = done_counts([two.log()], stems)
    assert all(counts_one[s] + counts_two[s] == 1 for s in stems), "a job ran twice or never"
    assert sum(counts_one.values()) > 5 and sum(counts_two.values()) > 5, "throughput did not add up"
    instances = {p.stem for p in (outbox / "_samwatch" / "instances").glob("*.json")}
    assert instances == {"a", "b"}


def test_watcher_keeps_up_while_a_long_job_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    drop_jobs(inbox, 1, folder="long", label="slow:20")
    wait_for(lambda: progress_state(outbox, "long/j0000") == "running", 60, what="long job running")
    started = time.monotonic()
    stems = drop_jobs(inbox, 30, folder="later")
    # Two are read ahead into the slot's pipeline (executor.pipeline_depth 3), the rest queue.
    wait_for(lambda: sorted(progress_state(outbox, s) or "" for s in stems) == ["queued"] * 28 + ["running"] * 2, 10,
             what="queued progress files")
    assert time.monotonic() - started < 10
    status = wait_for(lambda: (s := read_json(outbox / "_samwatch" / "status.json")) and s["current"] and s["queue"]["queued"] >= 28 and s, 10, what="status")
    assert status["current"]["job"] == "long/j0000" and status["current"]["percent"] > 0
    assert daemon.stop() == 0  # SIGTERM: the long job is interrupted after the grace and queued again
    assert "interrupted" in daemon.log()


def test_config_reload_on_change_and_sighup_keeps_old_config_when_bad(tmp_path: Path) -> None:
    weights = fake_weights(tmp_path)
    config = write_config(tmp_path, weights)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    wait_for(lambda: (outbox / "_samwatch" / "status.json").exists(), 60, what="heartbeat")
    # A job naming weights that do not exist yet fails...
    save_image(inbox / "r" / "a.png", SMALL)
    write_sidecar(inbox / "r" / "a.yaml", {"weights": "second", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: progress_state(outbox, "r/a") == "failed", 30, what="unknown weights")
    assert read_json(outbox / "r" / "a.error.json")["error"] == "unknown_weights"
    # ...add them to the config file: the daemon reloads by itself, the next job uses them.
    second = tmp_path / "second.pt"
    second.write_bytes(b"other fake weights")
    data = yaml.safe_load(config.read_text())
    data["weights"].append({"name": "second", "type": "vit_t", "path": str(second)})
    config.write_text(yaml.safe_dump(data))
    wait_for(lambda: "config reloaded" in daemon.log(), 30, what="reload on change")
    write_sidecar(inbox / "r" / "b.yaml", {"image": "a.png", "weights": "second", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: progress_state(outbox, "r/b") == "done", 30, what="job with new weights")
    assert read_json(outbox / "r" / "b.geojson")["samwatch"]["weights"]["name"] == "second"
    # A broken config is refused; the old one stays in force and status says why.
    config.write_text(config.read_text() + "bogus_key: 1\n")
    # (write_text truncates first: the daemon may see the empty file and refuse it too, so wait for this error)
    wait_for(lambda: "bogus_key: unknown key" in str((read_json(outbox / "_samwatch" / "status.json") or {}).get("config", {}).get("error")),
             30, what="config error in status")
    write_sidecar(inbox / "r" / "c.yaml", {"image": "a.png", "weights": "second", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: progress_state(outbox, "r/c") == "done", 30, what="job under the old config")
    # Restart-only keys are refused too; SIGHUP triggers a reload as well.
    data["inbox"] = str(tmp_path / "elsewhere")
    config.write_text(yaml.safe_dump(data))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "inbox: changing it needs a restart" in daemon.log(), 30, what="restart-only refusal")
    del data["weights"][-1]
    data["inbox"] = str(tmp_path / "inbox")
    config.write_text(yaml.safe_dump(data))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (read_json(outbox / "_samwatch" / "status.json") or {}).get("config", {}).get("error") is None, 30, what="good config again")
    write_sidecar(inbox / "r" / "d.yaml", {"image": "a.png", "weights": "second", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: progress_state(outbox, "r/d") == "failed", 30, what="removed weights refused")
    assert read_json(outbox / "r" / "d.error.json")["error"] == "unknown_weights"
    assert daemon.stop() == 0
    weights_json = read_json(outbox / "_samwatch" / "weights.json")
    # samapi's GET /sam/weights/ shape: type, name, URL (path entries as file:// URLs).
    assert any(w["type"] == "vit_t" and w["name"] == "default" and w["URL"].startswith("file://") for w in weights_json)
    assert any(w["type"] == "sam2_l" and w["URL"].startswith("https://") for w in weights_json)


def test_systemd_notify_ready_status_and_watchdog(tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(60)
    config = write_config(tmp_path, fake_weights(tmp_path))
    daemon = DaemonProcess(config, fake_model=True, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    try:
        messages: list[str] = []
        while not {"READY=1", "WATCHDOG=1"} <= set("\n".join(messages).split("\n")):
            messages.append(server.recv(4096).decode())
        assert any(m.startswith("STATUS=") for m in "\n".join(messages).split("\n"))
    finally:
        server.close()
    assert daemon.stop() == 0


def test_inputs_move_to_done_and_failed(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path), inputs={"after": "move"})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    save_image(inbox / "m" / "good.png", SMALL)
    write_sidecar(inbox / "m" / "good.yaml", {"prompts": [{"bbox": [1, 1, 9, 9]}]})
    save_image(inbox / "m" / "bad.png", SMALL)
    write_sidecar(inbox / "m" / "bad.yaml", {"weights": "nope", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    wait_for(lambda: (inbox / "_done" / "m" / "good.png").exists() and (inbox / "_failed" / "m" / "bad.yaml").exists(), 30, what="inputs moved")
    assert (inbox / "_done" / "m" / "good.yaml").exists() and (inbox / "_failed" / "m" / "bad.png").exists()
    assert not (inbox / "m" / "good.png").exists()
    # Moved inputs are not jobs again, and outputs stay: a later job has run meanwhile.
    drop_jobs(inbox, 1, folder="later")
    wait_for(lambda: finished(outbox, "later/j0000"), 30, what="a later job")
    assert progress_state(outbox, "m/good") == "done" and progress_state(outbox, "m/bad") == "failed"
    assert daemon.stop() == 0
