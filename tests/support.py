"""Helpers for tests that drive the real daemon as a subprocess on temp folders."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

FAST_WATCH = {"mode": "polling", "poll_interval_seconds": 0.1, "settle_seconds": 0.4}


def wait_for(condition: Callable[[], Any], timeout: float, *, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class InProcessDaemon:
    """The daemon of a config file in this process, on the fake model family: unthreaded, each
    ``step`` runs the jobs that are ready inside it; ``threaded``, the local executor's slots run
    them at once (several slots). For tests of plumbing; signals, kill -9, systemd and shares need
    ``DaemonProcess``. Its log lines are collected in ``lines``."""

    def __init__(self, config_path: Path, *, threaded: bool = False) -> None:
        from loguru import logger

        from fakes import fake_adapters
        from samwatch.config_file import load_config
        from samwatch.control.daemon import Daemon

        self.lines: list[str] = []
        self._sink = logger.add(lambda message: self.lines.append(message.rstrip("\n")), level="DEBUG",
                                format="{level} {message}")
        self.daemon = Daemon.from_config(load_config(config_path), config_path=config_path, threaded=threaded,
                                         adapters=fake_adapters)

    def run_until(self, condition: Callable[[], Any], timeout: float, *, what: str = "condition") -> Any:
        """Step on the real clock until ``condition`` holds (the watcher settles in real time)."""
        return wait_for(lambda: self.daemon.step(time.monotonic()) or condition(), timeout, what=what)

    def log(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        from loguru import logger

        self.daemon.close()
        logger.remove(self._sink)

    def __enter__(self) -> InProcessDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fake_weights(root: Path) -> list[dict[str, Any]]:
    """A registry entry for the fake model: any file will do, it is never loaded."""
    path = root / "fake.pt"
    path.write_bytes(b"fake weights")
    return [{"name": "default", "type": "vit_t", "path": str(path)}]


def write_config(root: Path, weights: list[dict[str, Any]], **overrides: Any) -> Path:
    config = {
        "inbox": str(root / "inbox"),
        "outbox": str(root / "outbox"),
        "state_dir": str(root / "state"),
        "device": "cpu",
        "watch": dict(FAST_WATCH),
        "service": {"heartbeat_seconds": 0.5, "instance": "test"},
        "weights": weights,
        # Eager encoders: each daemon test has its own state_dir, where an ONNX export would cost
        # ~5 s of CPU per test; tests/test_accelerate.py covers the fast paths and the default.
        "models": {"accelerate": {"cpu": []}},
    }
    config.update(overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    for folder in ("inbox", "outbox"):
        (root / folder).mkdir(exist_ok=True)
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def as_json(value: Any) -> Any:
    """``value`` as its JSON file would read back: a job's in-memory result holds rings as arrays."""
    import orjson

    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))


def progress_state(outbox: Path, stem: str) -> str | None:
    data = read_json(outbox / f"{stem}.progress.json")
    return data.get("state") if data else None


def finished(outbox: Path, stem: str) -> bool:
    return progress_state(outbox, stem) in ("done", "failed", "cancelled")


def save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_sidecar(path: Path, body: dict[str, Any]) -> Path:
    """Written aside and renamed, as a careful client would; tests of slow writers do otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(body) if path.suffix == ".json" else yaml.safe_dump(body))
    os.replace(tmp, path)
    return path


def coins() -> np.ndarray:
    from skimage import data

    return data.coins()  # 303×384 greyscale, real microscopy-like blobs


class DaemonProcess:
    """``samwatch run`` as a subprocess, with its log captured to a file.

    Every instance is listed in ``live`` so a failing test cannot leave its daemon running
    (conftest's ``no_leftover_daemons`` kills what a test started and did not stop).
    """

    live: list[DaemonProcess] = []

    def __init__(self, config: Path, *extra: str, fake_model: bool = False, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        extra_env = env or {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra_env)
        self._log = self.log_path.open("wb")
        program = [str(Path(__file__).with_name("fake_samwatch.py"))] if fake_model else ["-m", "samwatch"]
        self.proc = subprocess.Popen(
            [sys.executable, *program, "run", "--config", str(config), "--grace", "5", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        DaemonProcess.live.append(self)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def placed(detections: Iterable[Any], shape: tuple[int, int]) -> list[Any]:
    """Detections with their (cropped) masks put back into full frames, for comparing with a
    reference predictor's masks."""
    from dataclasses import replace

    result = []
    for detection in detections:
        x, y = (int(v) for v in detection.origin)
        full = np.zeros(shape, bool)
        height, width = detection.mask.shape
        full[y : y + height, x : x + width] = detection.mask
        result.append(replace(detection, mask=full, origin=(0, 0)))
    return result


@contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A loopback HTTP server for ``handler`` in a thread; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


class HeartbeatGaps:
    """Sampled often, keeps the longest time status.json went without a heartbeat."""

    def __init__(self, status: Path) -> None:
        self.status = status
        self.longest = 0.0

    def sample(self) -> None:
        from datetime import datetime

        body = read_json(self.status)
        if body is not None:
            beat = datetime.fromisoformat(body["updated"]).timestamp()
            self.longest = max(self.longest, time.time() - beat)
