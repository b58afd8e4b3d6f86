"""Field-ready regressions (issue 12): through a real ``samwatch run`` subprocess, or the daemon\nin-process where only its plumbing is under test."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support import DaemonProcess, InProcessDaemon, fake_weights, finished, progress_state, read_json, save_image, serve_http, wait_for, write_config, write_sidecar

SMALL = np.full((48, 64), 120, np.uint8)
TIMEOUT = 60


def drop(inbox: Path, stem: str, body: dict | None = None) -> str:
    save_image(inbox / f"{stem}.png", SMALL)
    write_sidecar(inbox / f"{stem}.yaml", body or {"prompts": [{"bbox": [1, 1, 20, 20]}]})
    return stem


@pytest.mark.parametrize("mode", ["native", "polling"])
def test_moved_inputs_never_run_again(tmp_path: Path, mode: str) -> None:
    watch = {"mode": mode, "poll_interval_seconds": 0.1, "settle_seconds": 0.3, "rescan_interval_seconds": 0.5}
    config = write_config(tmp_path, fake_weights(tmp_path), watch=watch, inputs={"after": "move"})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = InProcessDaemon(config)
    try:
        # Finished jobs walk into inbox/_done/ (and _failed/) at every depth; the later jobs give
        # the daemon time to (wrongly) pick the moved files up again before the checks below.
        for stem in ("p/c", "p/q/deep", "p/bad", "p/d", "p/q/e", "p/f", "p/g"):
            body = {"prompts": [{}]} if stem == "p/bad" else None
            drop(inbox, stem, body)
            daemon.run_until(lambda stem=stem: finished(outbox, stem), TIMEOUT, what=f"{stem} finished")
        assert (inbox / "_done" / "p" / "c.yaml").exists() and (inbox / "_failed" / "p" / "bad.yaml").exists()
        assert (inbox / "_done" / "p" / "q" / "deep.png").exists()
    finally:
        daemon.close()
    log = daemon.log()
    assert not (outbox / "_done").exists() and not (outbox / "_failed").exists(), log
    assert not (inbox / "_done" / "_done").exists(), log
    assert log.count("job p/c done") == 1 and "_done/" not in log.replace("inbox/_done", ""), log


def test_qupath_keeps_scores_as_measurements_and_a_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = InProcessDaemon(config)
    try:
        drop(inbox, "q", {"prompts": [{"bbox": [1, 1, 20, 20]}, {"bbox": [30, 5, 50, 25]}]})
        daemon.run_until(lambda: finished(outbox, "q"), TIMEOUT, what="q finished")
    finally:
        daemon.close()
    features = read_json(outbox / "q.geojson")["features"]
    assert len(features) == 2, daemon.log()
    for index, feature in enumerate(features):
        props = feature["properties"]
        assert props["name"] == "SAM (Quality=0.90)"
        assert props["measurements"] == {"SAM quality": 0.9, "SAM object index": index, "SAM prompt index": index}
        assert (props["quality"], props["object_idx"], props["prompt_idx"]) == (0.9, index, index)  # other readers


def samwatch_cli(*argv: str, shell_tail: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "samwatch", *argv]
    if shell_tail:
        return subprocess.run(" ".join(map(shlex.quote, command)) + shell_tail, shell=True,
                              capture_output=True, text=True, timeout=120)
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.subprocess
def test_status_with_a_broken_config_from_the_share_and_into_a_pipe(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    outbox = tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    try:
        wait_for(lambda: (outbox / "_samwatch" / "status.json").exists(), TIMEOUT, what="heartbeat")
        config.write_text(config.read_text() + "bogus_key: 1\n")  # refused: the daemon keeps its old config
        wait_for(lambda: (read_json(outbox / "_samwatch" / "status.json") or {}).get("config", {}).get("error"),
                 TIMEOUT, what="config error in status")
        broken = samwatch_cli("status", "--config", str(config))
        assert broken.returncode == 0, broken.stderr
        assert "state: idle" in broken.stdout and "bogus_key" in broken.stdout
        assert "the config has an error" in broken.stderr

        shared = samwatch_cli("status", "--outbox", str(outbox), "--json")  # no config at all
        assert shared.returncode == 0, shared.stderr
        assert json.loads(shared.stdout)["instance"] == "test"

        piped = samwatch_cli("status", "--outbox", str(outbox), shell_tail=" | true")
        assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
    finally:
        assert daemon.stop() == 0


@pytest.mark.subprocess
def test_check_reports_everything_run_refuses(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    weights = [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)},
               {"name": "gone", "type": "vit_t", "url": (tmp_path / "nowhere" / "w.pt").as_uri()}]
    config = write_config(tmp_path, weights)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    bodies = {
        "oob": {"prompts": [{"bbox": [0, 0, 500, 20]}]},  # the image is 64 x 48
        "sam3": {"model": "sam3", "prompts": [{"bbox": [1, 1, 20, 20]}]},  # sam3 takes text/exemplars
        "gone": {"weights": "gone", "prompts": [{"bbox": [1, 1, 20, 20]}]},
        "many": {"weights": "gone", "prompts": [{"bbox": [0, 0, 500, 20]}, {"points": [[10, 90]]}]},
    }
    daemon = DaemonProcess(config)
    try:
        for stem, body in bodies.items():
            drop(inbox, stem, body)
        wait_for(lambda: all(finished(outbox, stem) for stem in bodies), 180, what="every job finished")
    finally:
        assert daemon.stop() == 0
    refused = {stem: read_json(outbox / f"{stem}.error.json")["error"] for stem in bodies}
    assert refused == {"oob": "prompt_out_of_bounds", "sam3": "sidecar_invalid", "gone": "weights_download_failed",
                       "many": "weights_download_failed"}, daemon.log()

    checked = samwatch_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stderr
    lines = checked.stdout.splitlines()
    for stem, code in refused.items():
        assert any(line.startswith(f"{stem}.yaml: ") and f": {code}: " in line for line in lines), (stem, lines)
    many = [line for line in lines if line.startswith("many.yaml: ")]
    assert [line.split(": ")[1] for line in many] == ["weights", "prompts.0.bbox", "prompts.1.points.0"], many


@pytest.mark.subprocess
def test_saved_qupath_and_samapi_bodies_run(tmp_path: Path) -> None:
    (tmp_path / "lab.pt").write_bytes(b"fake weights")
    lab_url = (tmp_path / "lab.pt").as_uri()
    config = write_config(tmp_path, [*fake_weights(tmp_path), {"name": "lab", "type": "vit_t", "url": lab_url}])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    # As QuPath's SAM extension saves them: every optional key present, unset ones null.
    prompt = {"type": "vit_t", "bbox": [1, 1, 20, 20], "point_coords": None, "point_labels": None,
              "b64mask": None, "multimask_output": False, "checkpoint_url": lab_url}
    automask = {"type": "vit_t", "points_per_side": 4, "output_type": "Single mask", "include_image_edge": False,
                "crop_n_layers": 0, "checkpoint_url": lab_url}
    evil = {"type": "vit_t", "bbox": [1, 1, 20, 20], "checkpoint_url": "https://evil.example/x.pt"}
    daemon = DaemonProcess(config, fake_model=True)
    try:
        for stem, body in (("prompt", prompt), ("automask", automask), ("evil", evil)):
            save_image(inbox / f"{stem}.png", SMALL)
            write_sidecar(inbox / f"{stem}.json", body)
        wait_for(lambda: all(finished(outbox, s) for s in ("prompt", "automask", "evil")), TIMEOUT, what="jobs finished")
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    for stem in ("prompt", "automask"):
        assert progress_state(outbox, stem) == "done", (read_json(outbox / f"{stem}.error.json"), log)
        assert read_json(outbox / f"{stem}.geojson")["samwatch"]["weights"]["name"] == "lab"
    error = read_json(outbox / "evil.error.json")
    assert error["error"] == "checkpoint_url_refused" and "samwatch weights add" in error["message"]
    assert "evil.example" not in log.replace(error["message"], "").replace("evil.json", "")


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) ")


@pytest.mark.subprocess
def test_logs_one_format_no_import_noise_each_failure_once(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    nowhere = (tmp_path / "nowhere" / "mobile_sam.pt").as_uri()
    weights = [{"name": "real", "type": "vit_t", "path": str(vit_t_checkpoint)},
               {"name": "default", "type": "vit_t", "url": nowhere}]  # a default that cannot be fetched
    config = write_config(tmp_path, weights)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config)
    try:
        drop(inbox, "ok", {"weights": "real", "prompts": [{"bbox": [1, 1, 20, 20]}]})
        drop(inbox, "nodl")
        wait_for(lambda: finished(outbox, "ok") and finished(outbox, "nodl"), 180, what="both jobs finished")
    finally:
        assert daemon.stop() == 0
    log = daemon.log()
    assert progress_state(outbox, "ok") == "done", log
    assert "Warning" not in log and "tiny_vit" not in log, log  # timm / mobile_sam import noise
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    message = read_json(outbox / "nodl.error.json")["message"]
    assert "samwatch weights add default vit_t /path/to/mobile_sam.pt" in message  # for users without a config
    assert log.count("Downloading the vit_t weights 'default'") == log.count("job nodl failed") >= 1, log

    fetch = samwatch_cli("weights", "fetch", "default", "--type", "vit_t", "--config", str(config))
    assert fetch.returncode == 1 and fetch.stderr.count("Downloading the vit_t weights 'default'") == 1, fetch.stderr
    assert all(LOG_LINE.match(line) or line.startswith("vit_t/default: ") for line in fetch.stderr.splitlines()), fetch.stderr


def test_admin_docs_call_samwatch_by_its_installed_path() -> None:
    text = (Path(__file__).resolve().parents[1] / "systemd" / "README.md").read_text()
    operate = text.split("## Operate", 1)[1].split("\n## ", 1)[0]
    block = operate.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands and all(not command.startswith("samwatch ") for command in commands), commands
    assert "## Share permissions for QuPath users" in text


# -- defects 2 and 3: the daemon follows what changes ----------------------------------------


def fake_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE_SAMWATCH), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


FAKE_SAMWATCH = Path(__file__).with_name("fake_samwatch.py")


@pytest.mark.subprocess
def test_a_daemon_on_defaults_follows_the_default_config_file(tmp_path: Path) -> None:
    (tmp_path / "fake.pt").write_bytes(b"fake weights")
    log = (tmp_path / "daemon.log").open("wb")
    # No --config and no ./samwatch.config.yaml: the built-in defaults, whose vit_t download fails here.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAMWATCH_FAKE_DEFAULT_URL": (tmp_path / "nowhere.pt").as_uri()}
    proc = subprocess.Popen([sys.executable, str(FAKE_SAMWATCH), "run", "--grace", "5"], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    try:
        wait_for(lambda: (outbox / "_samwatch" / "status.json").exists(), TIMEOUT, what="heartbeat")
        status = read_json(outbox / "_samwatch" / "status.json")
        assert status["config"]["path"] == str(tmp_path / "samwatch.config.yaml")  # watched, not yet there
        drop(inbox, "a")
        wait_for(lambda: progress_state(outbox, "a") == "failed", TIMEOUT, what="a failed: no weights")
        added = fake_cli("weights", "add", "default", "vit_t", str(tmp_path / "fake.pt"), cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        # The file appeared: the daemon reads it, and the job that failed for want of weights runs again.
        wait_for(lambda: progress_state(outbox, "a") == "done", TIMEOUT, what="a done after weights add")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (tmp_path / "daemon.log").read_text().count("config reloaded") >= 2, TIMEOUT, what="SIGHUP reload")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log.close()


@pytest.mark.subprocess
def test_failed_jobs_run_again_when_what_they_need_appears(tmp_path: Path) -> None:
    late = tmp_path / "late.pt"
    fetched = tmp_path / "fetched.pt"
    weights = [*fake_weights(tmp_path), {"name": "late", "type": "vit_t", "url": late.as_uri()},
               {"name": "fetched", "type": "vit_t", "url": fetched.as_uri()}]
    config = write_config(tmp_path, weights, service={"heartbeat_seconds": 0.5, "instance": "test",
                                                      "retry_base_seconds": 2, "retry_attempts": 3})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    try:
        drop(inbox, "late", {"weights": "late", "prompts": [{"bbox": [1, 1, 20, 20]}]})
        drop(inbox, "unknown", {"weights": "lab", "prompts": [{"bbox": [1, 1, 20, 20]}]})
        drop(inbox, "bad", {"prompts": [{}]})
        for stem in ("late", "unknown", "bad"):
            wait_for(lambda stem=stem: progress_state(outbox, stem) == "failed", TIMEOUT, what=f"{stem} failed")
        assert read_json(outbox / "late.error.json")["error"] == "weights_download_failed"
        assert read_json(outbox / "unknown.error.json")["error"] == "unknown_weights"
        late.write_bytes(b"fake weights")  # the server is back: the backoff retry finds it
        wait_for(lambda: progress_state(outbox, "late") == "done", TIMEOUT, what="late done after backoff")
        # Registered later: the config reload runs it again.
        added = fake_cli("weights", "add", "lab", "vit_t", str(tmp_path / "fake.pt"), "--config", str(config), cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        wait_for(lambda: progress_state(outbox, "unknown") == "done", TIMEOUT, what="unknown done after weights add")
        # Asked by hand: a failure nothing can cure by itself runs again on request.
        assert daemon.log().count("job bad started") == 1
        retried = fake_cli("retry", "bad.yaml", "--config", str(config), cwd=inbox)
        assert retried.returncode == 0, retried.stderr
        wait_for(lambda: daemon.log().count("job bad started") == 2, TIMEOUT, what="bad started again")
        wait_for(lambda: progress_state(outbox, "bad") == "failed", TIMEOUT, what="bad failed again")
    finally:
        assert daemon.stop() == 0
    assert not (outbox / "late.error.json").exists() and not (outbox / "unknown.error.json").exists()


class FirstDownloadSlow(http.server.BaseHTTPRequestHandler):
    """Serves 2 MiB: the first time slowly (20 s, time enough to cancel it), then at once."""

    served = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        payload = bytes(range(256)) * 8192
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        slow = FirstDownloadSlow.served == 0
        FirstDownloadSlow.served += 1
        for start in range(0, len(payload), 64 * 1024):
            self.wfile.write(payload[start : start + 64 * 1024])
            self.wfile.flush()
            if slow:
                time.sleep(0.6)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def server():
    FirstDownloadSlow.served = 0
    with serve_http(FirstDownloadSlow) as url:
        yield url


@pytest.mark.subprocess
def test_weights_cancel_tells_waiting_jobs_how_to_resume(tmp_path: Path, server: str) -> None:
    weights = [*fake_weights(tmp_path), {"name": "remote", "type": "vit_t", "url": f"{server}/weights.pt"}]
    config = write_config(tmp_path, weights)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    try:
        for stem in ("mine", "theirs"):
            drop(inbox, stem, {"weights": "remote", "prompts": [{"bbox": [1, 1, 20, 20]}]})
        wait_for(lambda: all((read_json(outbox / f"{s}.progress.json") or {}).get("stage") == "waiting for weights"
                             for s in ("mine", "theirs")), TIMEOUT, what="both waiting for the download")
        cancelled = fake_cli("weights", "cancel", "--config", str(config), cwd=tmp_path)
        assert cancelled.returncode == 0, cancelled.stderr
        wait_for(lambda: all(progress_state(outbox, s) == "failed" for s in ("mine", "theirs")), TIMEOUT, what="failed")
        for stem in ("mine", "theirs"):
            error = read_json(outbox / f"{stem}.error.json")
            assert error["error"] == "weights_download_cancelled", error
            assert "samwatch weights fetch remote --type vit_t" in error["message"], error
        # Resuming as the message says: once the file is on disk, both jobs run again by themselves.
        fetched = fake_cli("weights", "fetch", "remote", "--type", "vit_t", "--config", str(config), cwd=tmp_path)
        assert fetched.returncode == 0, fetched.stderr
        wait_for(lambda: all(progress_state(outbox, s) == "done" for s in ("mine", "theirs")), TIMEOUT, what="done")
    finally:
        assert daemon.stop() == 0
