"""Starting, stopping, crashing and restarting the real daemon."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crash_rig import ledger_states
from support import DaemonProcess, coins, finished, read_json, save_image, wait_for, write_config, write_sidecar

pytestmark = pytest.mark.subprocess  # each test starts a real samwatch process


def _jobs(inbox: Path, count: int) -> list[str]:
    image = coins()
    stems = []
    for index in range(count):
        stem = f"batch/img{index:02d}"
        save_image(inbox / f"{stem}.png", image)
        write_sidecar(inbox / f"{stem}.yaml", {"prompts": [{"bbox": [40 + index, 40, 120, 110]}]})
        stems.append(stem)
    return stems


def test_kill_9_mid_queue_then_restart_loses_and_doubles_nothing(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    config = write_config(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stems = _jobs(inbox, 5)
    first = DaemonProcess(config)
    wait_for(lambda: sum(finished(outbox, s) for s in stems) >= 2, 180, what="two jobs done")
    first.kill()
    done_before = {s for s in stems if finished(outbox, s)}
    assert len(done_before) < len(stems), "kill came too late to test a restart"
    # files first, then the ledger (control/outcomes.py): a kill between the two leaves a job
    # finished in the outbox and running in the ledger, and the restart runs it once more
    recorded = {stem for stem, state in ledger_states(tmp_path).items() if state == "done"}
    second = DaemonProcess(config)
    wait_for(lambda: all(finished(outbox, s) for s in stems), 240, what="all jobs done after restart")
    assert second.stop() == 0
    log = second.log()
    for stem in stems:
        assert read_json(outbox / f"{stem}.progress.json")["state"] == "done"
        assert read_json(outbox / f"{stem}.geojson")["type"] == "FeatureCollection"
        assert not (outbox / f"{stem}.error.json").exists()
        # Jobs the ledger recorded before the kill are not redone; every other one is, once.
        assert (f"job {stem} done" in log) == (stem not in recorded), stem
    leftovers = [p for p in outbox.rglob(".samwatch-*")]
    assert leftovers == []


def test_sigterm_exits_zero_and_once_reports_failures(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    config = write_config(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    save_image(inbox / "ok.png", coins())
    write_sidecar(inbox / "ok.yaml", {"prompts": [{"bbox": [40, 40, 120, 110]}]})
    once = subprocess.run(
        [sys.executable, "-m", "samwatch", "run", "--once", "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert once.returncode == 0, once.stderr
    assert read_json(outbox / "ok.progress.json")["state"] == "done"
    (inbox / "broken.yaml").write_text("prompts: [")
    save_image(inbox / "broken.png", coins())
    once = subprocess.run(
        [sys.executable, "-m", "samwatch", "run", "--once", "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert once.returncode == 1, once.stderr
    assert read_json(outbox / "broken.error.json")["error"] == "sidecar_parse_error"
    daemon = DaemonProcess(config)
    wait_for(lambda: "started" in daemon.log(), 60, what="daemon start")
    assert daemon.stop(signal.SIGTERM) == 0
    assert "samwatch stopped" in daemon.log()


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("inbox: in\nwatch: {mode: sometimes}\nbogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "samwatch", "run", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert str(path) in result.stderr and "watch.mode" in result.stderr and "bogus: unknown key" in result.stderr


def test_defaults_create_folders_in_the_working_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "samwatch", "run", "--once"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for folder in ("inbox", "outbox", ".samwatch"):
        assert (tmp_path / folder).is_dir()


def test_cli_schema_version_and_check(tmp_path: Path) -> None:
    run = lambda *args: subprocess.run([sys.executable, "-m", "samwatch", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run("--version").stdout.strip()
    schema = json.loads(run("schema", "sidecar").stdout)
    assert "prompts" in schema["properties"] and "bbox" in schema["x-samapi-keys"]
    assert "weights" in json.loads(run("schema", "config").stdout)["properties"]
    (tmp_path / "inbox").mkdir()
    (tmp_path / "w.pt").write_bytes(b"x")  # check asks that weights be on disk or obtainable: no network here
    (tmp_path / "samwatch.config.yaml").write_text("weights: [{name: default, type: vit_t, path: w.pt}]\n")
    save_image(tmp_path / "inbox" / "a.png", coins())
    (tmp_path / "inbox" / "a.yaml").write_text("prompts: [{bbox: [1, 2, 3, 4]}]\n")
    (tmp_path / "inbox" / "b.yaml").write_text("prompts: [{bbox: [1, 2, 3, 4]}]\nfoo: 1\n")
    result = run("check")
    assert result.returncode == 1
    assert "b.yaml: foo: sidecar_invalid" in result.stdout and "a.yaml" not in result.stdout
    assert run("check", str(tmp_path / "inbox" / "a.yaml")).returncode == 0
    assert run("bogus").returncode == 2
