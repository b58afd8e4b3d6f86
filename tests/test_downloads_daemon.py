"""Weights fetched by a running daemon (in-process, fake model) from a loopback server: waiting
jobs, progress, failures."""

from __future__ import annotations

import http.server
import time
from pathlib import Path

import pytest

from support import InProcessDaemon, fake_weights, progress_state, read_json, save_image, serve_http, write_config, write_sidecar
from test_service import SMALL

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB


class SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/weights.pt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        for start in range(0, len(PAYLOAD), 256 * 1024):  # about 3 s in all
            self.wfile.write(PAYLOAD[start : start + 256 * 1024])
            self.wfile.flush()
            time.sleep(0.25)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def server():
    with serve_http(SlowHandler) as url:
        yield url


def test_jobs_wait_for_a_download_while_others_run(tmp_path: Path, server: str) -> None:
    weights = fake_weights(tmp_path) + [
        {"name": "remote", "type": "vit_t", "url": f"{server}/weights.pt"},
        {"name": "missing", "type": "vit_t", "url": f"{server}/nothing.pt"},
    ]
    config = write_config(tmp_path, weights)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    with InProcessDaemon(config) as daemon:
        save_image(inbox / "d" / "img.png", SMALL)
        write_sidecar(inbox / "d" / "img.remote.yaml", {"weights": "remote", "prompts": [{"bbox": [1, 1, 9, 9]}]})
        daemon.run_until(lambda: (read_json(outbox / "d" / "img.remote.progress.json") or {}).get("stage") == "waiting for weights", 60, what="waiting")
        # Its percent moves with the download (within the waiting stage's span, 5-10).
        daemon.run_until(lambda: (read_json(outbox / "d" / "img.remote.progress.json") or {}).get("percent", 0) >= 6, 30, what="download percent moving")
        # While the download runs, a job for weights on disk goes ahead.
        write_sidecar(inbox / "d" / "img.local.yaml", {"prompts": [{"bbox": [1, 1, 9, 9]}]})
        daemon.run_until(lambda: progress_state(outbox, "d/img.local") == "done", 30, what="other job done during the download")
        assert progress_state(outbox, "d/img.remote") == "queued"
        status = read_json(outbox / "_samwatch" / "status.json")
        assert status["queue"]["waiting"] == 1
        daemon.run_until(lambda: progress_state(outbox, "d/img.remote") == "done", 60, what="job after the download")
        meta = read_json(outbox / "d" / "img.remote.geojson")["samwatch"]["weights"]
        import hashlib

        assert meta["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        assert list((tmp_path / "state" / "weights").rglob("*.part")) == []
        # A download that fails fails its waiting job with a clear error; the daemon goes on.
        write_sidecar(inbox / "d" / "img.missing.yaml", {"weights": "missing", "prompts": [{"bbox": [1, 1, 9, 9]}]})
        daemon.run_until(lambda: progress_state(outbox, "d/img.missing") == "failed", 60, what="failed download")
        error = read_json(outbox / "d" / "img.missing.error.json")
        assert error["error"] == "weights_download_failed" and "404" in error["message"]
