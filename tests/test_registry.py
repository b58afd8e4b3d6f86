"""The weights registry: downloads against a loopback HTTP server only, hf mocked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hf_errors

import support
from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.weights import registry as registry_module
from samwatch.vocab import LoadSpec
from samwatch.weights.entries import download_path
from samwatch.weights.locks import request_cancel
from samwatch.weights.registry import DownloadState, WeightsRegistry
from samwatch.models.weights_io import load_checkpoint
from samwatch.families import DEFAULT_WEIGHT_URLS, MODEL_TYPES

PIECE = 64 * 1024


# -- a loopback server ------------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    etag: str | None = None
    ranges: bool = False  # honours Range (with If-Range against etag)
    drop_after: int | None = None  # close the connection after this many bytes
    delay: float = 0.0  # seconds between pieces: a slow link


@dataclass
class Loopback:
    port: int = 0
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> list[dict[str, str]]:
        return [headers for got, headers in self.requests if got == path]


class _Server(ThreadingHTTPServer):
    block_on_close = False  # slow handlers of cancelled downloads must not hold up teardown


def _handler_for(loopback: Loopback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            loopback.requests.append((self.path, dict(self.headers)))
            route = loopback.routes.get(self.path)
            if route is None or route.status != 200:
                self.send_error(route.status if route else 404)
                return
            start = 0
            wanted = self.headers.get("Range")
            if route.ranges and wanted and self.headers.get("If-Range") in (None, route.etag):
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
            else:
                self.send_response(200)
            body = route.body[start:]
            self.send_header("Content-Length", str(len(body)))
            if route.etag:
                self.send_header("ETag", route.etag)
            self.end_headers()
            limit = len(body) if route.drop_after is None else route.drop_after
            try:
                for offset in range(0, limit, PIECE):
                    self.wfile.write(body[offset : min(offset + PIECE, limit)])
                    time.sleep(route.delay)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def server() -> Any:
    loopback = Loopback()
    httpd = _Server(("127.0.0.1", 0), _handler_for(loopback))
    loopback.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield loopback
    httpd.shutdown()
    httpd.server_close()


# -- helpers ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """A small real checkpoint (about 2 MB: several 1 MiB chunks)."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(512, 1024).state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture
def slow_body() -> bytes:
    return os.urandom(4 * 1024 * 1024)  # 64 pieces at 20 ms: about 1.3 s


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_registry(state_dir: Path) -> Any:
    made: list[WeightsRegistry] = []

    def make(entries: list[WeightsEntry], **kwargs: Any) -> WeightsRegistry:
        kwargs.setdefault("opener", urllib.request.build_opener(urllib.request.ProxyHandler({})))
        registry = WeightsRegistry(entries, kwargs.pop("state", state_dir), **kwargs)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    return support.wait_for(predicate, timeout, what="the registry")


def settled(registry: WeightsRegistry, model_type: str, name: str) -> LoadSpec | DownloadState:
    """The request's outcome once it is no longer downloading."""

    def outcome() -> LoadSpec | DownloadState | None:
        result = registry.request(model_type, name)
        return result if isinstance(result, LoadSpec) or result.state == "failed" else None

    return wait_for(outcome)


def downloading(registry: WeightsRegistry, model_type: str, name: str) -> DownloadState:
    """Wait until bytes are flowing."""

    def flowing() -> DownloadState | None:
        result = registry.request(model_type, name)
        return result if isinstance(result, DownloadState) and result.bytes_done > 0 else None

    return wait_for(flowing)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- URL entries ------------------------------------------------------------------------


def test_download_is_verified_recorded_and_loadable(
    server: Loopback, make_registry: Any, checkpoint: bytes, state_dir: Path
) -> None:
    server.routes["/ckpt/mobile_sam.pt"] = Route(checkpoint, etag='"v1"')
    url = server.url("/ckpt/mobile_sam.pt")
    registry = make_registry([WeightsEntry(name="lab", type="vit_t", url=url, sha256=sha(checkpoint))])

    first = registry.request("vit_t", "lab")
    assert isinstance(first, DownloadState) and first.state == "downloading" and first.error is None
    spec = settled(registry, "vit_t", "lab")

    assert isinstance(spec, LoadSpec)
    assert (spec.model_type, spec.weights_name, spec.sha256, spec.source) == ("vit_t", "lab", sha(checkpoint), url)
    assert spec.checkpoint.parent == state_dir / "weights" / "vit_t"
    assert spec.checkpoint.name.startswith("mobile_sam-") and spec.checkpoint.suffix == ".pt"
    record = json.loads(spec.checkpoint.with_name(spec.checkpoint.name + ".json").read_text())
    assert record["url"] == url and record["sha256"] == sha(checkpoint) and record["size"] == len(checkpoint)
    assert "fetched" in record
    assert not [name for name in files_in(spec.checkpoint.parent) if ".part" in name]
    assert set(load_checkpoint(spec)) == {"weight", "bias"}

    assert registry.request("vit_t", "lab") == spec
    restarted = make_registry([WeightsEntry(name="lab", type="vit_t", url=url, sha256=sha(checkpoint))])
    assert restarted.request("vit_t", "lab") == spec
    assert len(server.gets("/ckpt/mobile_sam.pt")) == 1


def test_progress_is_reported_while_downloading(server: Loopback, make_registry: Any, slow_body: bytes) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02)
    registry = make_registry([WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))])
    state = downloading(registry, "vit_t", "slow")
    assert state.bytes_total == len(slow_body)
    assert 0 < state.percent < 100
    assert state.to_dict()["state"] == "downloading"
    spec = settled(registry, "vit_t", "slow")
    assert isinstance(spec, LoadSpec) and spec.sha256 == sha(slow_body)  # computed when none is configured


def test_checksum_mismatch_keeps_no_file(
    server: Loopback, make_registry: Any, checkpoint: bytes, state_dir: Path
) -> None:
    server.routes["/w.pt"] = Route(checkpoint, etag='"v1"')
    wrong = "0" * 64
    registry = make_registry([WeightsEntry(name="lab", type="vit_b", url=server.url("/w.pt"), sha256=wrong)])
    registry.request("vit_b", "lab")
    state = settled(registry, "vit_b", "lab")
    assert isinstance(state, DownloadState) and state.state == "failed" and state.error is not None
    assert state.error.code == "weights_checksum_mismatch"
    assert wrong in state.error.message and sha(checkpoint) in state.error.message
    assert state.error.to_dict()["expected"] == wrong
    assert [n for n in files_in(state_dir / "weights" / "vit_b") if not n.endswith(".lock")] == []


def test_dropped_connection_fails_and_retries_after_the_pause(
    server: Loopback, make_registry: Any, checkpoint: bytes, state_dir: Path
) -> None:
    server.routes["/w.pt"] = Route(checkpoint, drop_after=len(checkpoint) // 2)
    clock = FakeClock()
    entry = WeightsEntry(name="lab", type="vit_t", url=server.url("/w.pt"), sha256=sha(checkpoint))
    registry = make_registry([entry], clock=clock, retry_after_seconds=60)

    registry.request("vit_t", "lab")
    failed = settled(registry, "vit_t", "lab")
    assert isinstance(failed, DownloadState) and failed.error is not None
    assert failed.error.code == "weights_download_failed" and "closed after" in failed.error.message
    # without a validator the half file cannot be resumed safely: nothing is kept
    assert [n for n in files_in(state_dir / "weights" / "vit_t") if not n.endswith(".lock")] == []

    clock.now += 30
    assert registry.request("vit_t", "lab") == failed  # no hot retry loop
    assert len(server.gets("/w.pt")) == 1

    server.routes["/w.pt"].drop_after = None
    clock.now += 31
    retried = registry.request("vit_t", "lab")
    assert isinstance(retried, DownloadState) and retried.state == "downloading"
    spec = settled(registry, "vit_t", "lab")
    assert isinstance(spec, LoadSpec) and spec.sha256 == sha(checkpoint)
    assert len(server.gets("/w.pt")) == 2


@pytest.mark.parametrize(("status", "code"), [(404, "weights_download_failed"), (403, "weights_unavailable")])
def test_http_errors(server: Loopback, make_registry: Any, status: int, code: str) -> None:
    server.routes["/w.pt"] = Route(status=status)
    registry = make_registry([WeightsEntry(name="lab", type="vit_t", url=server.url("/w.pt"))])
    registry.request("vit_t", "lab")
    state = settled(registry, "vit_t", "lab")
    assert isinstance(state, DownloadState) and state.error is not None
    assert state.error.code == code and f"HTTP {status}" in state.error.message


def test_cancel_in_process_removes_the_part(
    server: Loopback, make_registry: Any, slow_body: bytes, state_dir: Path
) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02, etag='"v1"', ranges=True)
    registry = make_registry([WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))])
    downloading(registry, "vit_t", "slow")
    assert registry.cancel("vit_b") == 0
    assert registry.cancel("vit_t", "slow") == 1
    state = settled(registry, "vit_t", "slow")
    assert isinstance(state, DownloadState) and state.error is not None and state.error.code == "weights_download_cancelled"
    assert [n for n in files_in(state_dir / "weights" / "vit_t") if not n.endswith(".lock")] == []


def test_cancel_file_from_another_process(
    server: Loopback, make_registry: Any, slow_body: bytes, state_dir: Path
) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02)
    stale = request_cancel(state_dir)  # an old request, for an earlier download
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    registry = make_registry([WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))])

    downloading(registry, "vit_t", "slow")
    request_cancel(state_dir, "vit_b")  # for another type
    before = registry.request("vit_t", "slow").bytes_done  # type: ignore[union-attr]
    # more bytes arrived, so the cancel file was checked since and ignored
    wait_for(lambda: registry.request("vit_t", "slow").bytes_done > before)  # type: ignore[union-attr]
    assert registry.request("vit_t", "slow").state == "downloading"  # type: ignore[union-attr]

    request_cancel(state_dir, "vit_t", "slow")
    state = settled(registry, "vit_t", "slow")
    assert isinstance(state, DownloadState) and state.error is not None and state.error.code == "weights_download_cancelled"
    assert [n for n in files_in(state_dir / "weights" / "vit_t") if not n.endswith(".lock")] == []


def test_leftover_part_is_resumed_with_a_range_request(
    server: Loopback, make_registry: Any, checkpoint: bytes, state_dir: Path
) -> None:
    server.routes["/w.pt"] = Route(checkpoint, etag='"v1"', ranges=True)
    entry = WeightsEntry(name="lab", type="vit_t", url=server.url("/w.pt"), sha256=sha(checkpoint))
    target = download_path(state_dir / "weights", entry)
    target.parent.mkdir(parents=True)
    half = len(checkpoint) // 2
    # what a process killed mid-download leaves behind
    target.with_name(target.name + ".part").write_bytes(checkpoint[:half])
    target.with_name(target.name + ".part.json").write_text(
        json.dumps({"url": entry.url, "validator": '"v1"', "total": len(checkpoint)})
    )
    registry = make_registry([entry])
    registry.request("vit_t", "lab")
    spec = settled(registry, "vit_t", "lab")
    assert isinstance(spec, LoadSpec) and spec.checkpoint.read_bytes() == checkpoint
    (headers,) = server.gets("/w.pt")
    assert headers["Range"] == f"bytes={half}-"
    assert not target.with_name(target.name + ".part").exists()


@pytest.mark.parametrize(
    "leftover",
    [
        pytest.param(None, id="no-validator"),
        pytest.param({"validator": '"old"'}, id="file-changed-upstream"),
    ],
)
def test_leftover_part_is_never_used_as_is(
    server: Loopback, make_registry: Any, checkpoint: bytes, state_dir: Path, leftover: dict[str, str] | None
) -> None:
    server.routes["/w.pt"] = Route(checkpoint, etag='"v2"', ranges=True)
    entry = WeightsEntry(name="lab", type="vit_t", url=server.url("/w.pt"))
    target = download_path(state_dir / "weights", entry)
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(b"garbage" * 100_000)
    if leftover is not None:
        info = {"url": entry.url, "total": len(checkpoint)} | leftover
        target.with_name(target.name + ".part.json").write_text(json.dumps(info))
    registry = make_registry([entry])
    registry.request("vit_t", "lab")
    spec = settled(registry, "vit_t", "lab")
    assert isinstance(spec, LoadSpec) and spec.checkpoint.read_bytes() == checkpoint
    assert spec.sha256 == sha(checkpoint)


def test_two_processes_download_once(server: Loopback, make_registry: Any, slow_body: bytes) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02)
    entries = [WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))]
    first, second = make_registry(entries), make_registry(entries)  # own flock fds, as two processes
    downloading(first, "vit_t", "slow")
    waiting = wait_for(
        lambda: (state := second.request("vit_t", "slow")) and getattr(state, "elsewhere", False) and state
    )
    assert waiting.state == "downloading"
    assert second.listing()  # listing while another holds the lock must not block
    a, b = settled(first, "vit_t", "slow"), settled(second, "vit_t", "slow")
    assert isinstance(a, LoadSpec) and a == b
    assert len(server.gets("/slow.pt")) == 1


def test_fetch_blocks_reports_progress_and_retries_at_once(
    server: Loopback, make_registry: Any, checkpoint: bytes
) -> None:
    server.routes["/w.pt"] = Route(status=404)
    registry = make_registry([WeightsEntry(name="lab", type="vit_t", url=server.url("/w.pt"))], clock=FakeClock())
    with pytest.raises(JobError) as failure:
        registry.fetch("vit_t", "lab")
    assert failure.value.code == "weights_download_failed" and "404" in failure.value.message

    server.routes["/w.pt"] = Route(checkpoint)
    seen: list[tuple[int, int | None]] = []
    spec = registry.fetch("vit_t", "lab", lambda done, total: seen.append((done, total)))
    assert spec.sha256 == sha(checkpoint)
    assert seen[-1] == (len(checkpoint), len(checkpoint))


def test_close_cancels_and_joins(server: Loopback, make_registry: Any, slow_body: bytes, state_dir: Path) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02)
    registry = make_registry([WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))])
    downloading(registry, "vit_t", "slow")
    registry.close()
    assert [n for n in files_in(state_dir / "weights" / "vit_t") if not n.endswith(".lock")] == []


# -- path entries -----------------------------------------------------------------------


def test_path_entry_is_hashed_once_and_verified(
    tmp_path: Path, make_registry: Any, checkpoint: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = registry_module.sha256_file
    monkeypatch.setattr(registry_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    weights = tmp_path / "sam2_lab.pt"
    weights.write_bytes(checkpoint)
    config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    registry = make_registry(
        [
            WeightsEntry(name="lab", type="sam2_t", path=weights, sha256=sha(checkpoint), config=config),
            WeightsEntry(name="bare", type="sam2_t", path=weights),
            WeightsEntry(name="wrong", type="sam2_t", path=weights, sha256="1" * 64),
            WeightsEntry(name="gone", type="sam2_t", path=tmp_path / "gone.pt"),
        ]
    )
    spec = registry.request("sam2_t", "lab")
    assert spec == LoadSpec("sam2_t", weights, "lab", sha(checkpoint), config, str(weights))
    assert registry.request("sam2_t", "lab") == spec
    assert registry.request("sam2_t", "bare").sha256 == sha(checkpoint)  # type: ignore[union-attr]
    assert len(hashed) == 1

    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    registry.request("sam2_t", "lab")
    assert len(hashed) == 2

    with pytest.raises(JobError) as mismatch:
        registry.request("sam2_t", "wrong")
    assert mismatch.value.code == "weights_checksum_mismatch"
    assert "1" * 64 in mismatch.value.message and sha(checkpoint) in mismatch.value.message
    with pytest.raises(JobError) as gone:
        registry.request("sam2_t", "gone")
    assert gone.value.code == "weights_unavailable" and "gone.pt" in gone.value.message


class _PickledCode:
    """Pickles as a call to os.mkdir: loading it with plain pickle would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_carrying_code_is_refused(tmp_path: Path, make_registry: Any) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _PickledCode(marker)}, weights)
    registry = make_registry([WeightsEntry(name="evil", type="vit_t", path=weights)])
    spec = registry.request("vit_t", "evil")
    assert isinstance(spec, LoadSpec)
    with pytest.raises(JobError) as refused:
        load_checkpoint(spec)
    assert refused.value.code == "weights_unsafe"
    assert not marker.exists()


# -- the table --------------------------------------------------------------------------


def test_defaults_for_every_type_and_overrides(make_registry: Any) -> None:
    override = WeightsEntry(name="default", type="vit_h", url="https://example.org/mirror/vit_h.pth")
    registry = make_registry([override])
    assert {e.type for e in registry.entries() if e.name == "default"} == set(MODEL_TYPES)
    assert registry.entry("vit_h", "default") == override
    assert registry.entry("sam3", "default").url == DEFAULT_WEIGHT_URLS["sam3"]


def test_unknown_weights_lists_the_registered_names(make_registry: Any) -> None:
    registry = make_registry([WeightsEntry(name="lab", type="vit_b", url="https://example.org/lab.pth")])
    with pytest.raises(JobError) as unknown:
        registry.request("vit_b", "nope")
    error = unknown.value
    assert error.code == "unknown_weights" and error.field == "weights"
    assert "default, lab" in error.message and "samwatch weights add NAME vit_b URL" in error.message


def test_update_reports_changed_keys_and_cancels_removed_downloads(
    server: Loopback, make_registry: Any, slow_body: bytes, tmp_path: Path, state_dir: Path
) -> None:
    server.routes["/slow.pt"] = Route(slow_body, delay=0.02)
    lab = WeightsEntry(name="lab", type="vit_b", url="https://example.org/lab.pth")
    local = WeightsEntry(name="local", type="vit_b", path=tmp_path / "local.pt")
    mirror = WeightsEntry(name="default", type="vit_h", url="https://example.org/vit_h.pth")
    slow = WeightsEntry(name="slow", type="vit_t", url=server.url("/slow.pt"))
    registry = make_registry([lab, local, mirror, slow])
    downloading(registry, "vit_t", "slow")

    relabelled = lab.model_copy(update={"sha256": "2" * 64})
    added = WeightsEntry(name="new", type="vit_l", url="https://example.org/new.pth")
    changed = registry.update([relabelled, added])
    assert changed == {("vit_b", "lab"), ("vit_b", "local"), ("vit_h", "default"), ("vit_t", "slow")}
    assert registry.entry("vit_h", "default").url == DEFAULT_WEIGHT_URLS["vit_h"]
    assert registry.entry("vit_l", "new") == added
    assert registry.update([relabelled, added]) == set()

    folder = state_dir / "weights" / "vit_t"
    wait_for(lambda: not [n for n in files_in(folder) if not n.endswith(".lock")])
    with pytest.raises(JobError):
        registry.entry("vit_t", "slow")


def test_listings(server: Loopback, make_registry: Any, checkpoint: bytes, tmp_path: Path) -> None:
    server.routes["/w.pt"] = Route(checkpoint)
    local = tmp_path / "local.pt"
    local.write_bytes(b"x" * 10)
    registry = make_registry(
        [
            WeightsEntry(name="lab", type="vit_b", url=server.url("/w.pt")),
            WeightsEntry(name="local", type="vit_b", path=local, sha256="3" * 64),
            WeightsEntry(name="later", type="vit_b", url="https://example.org/later.pth"),
        ]
    )
    registry.fetch("vit_b", "lab")
    items = {(i["type"], i["name"]): i for i in registry.listing()}
    assert len(items) == len(MODEL_TYPES) + 3
    lab = items[("vit_b", "lab")]
    assert lab["on_disk"] and lab["state"] == "ready" and lab["size_bytes"] == len(checkpoint)
    assert lab["sha256"] == sha(checkpoint) and lab["source"] == server.url("/w.pt")
    assert items[("vit_b", "local")] | {"path": None} == {
        "name": "local", "type": "vit_b", "source": str(local), "sha256": "3" * 64, "path": None,
        "on_disk": True, "size_bytes": 10, "state": "ready",
    }
    later = items[("vit_b", "later")]
    assert (later["on_disk"], later["state"], later["size_bytes"]) == (False, "not fetched", None)

    samapi = registry.samapi_listing()
    assert {"type": "vit_b", "name": "lab", "URL": server.url("/w.pt")} in samapi
    assert {"type": "vit_b", "name": "local", "URL": local.resolve().as_uri()} in samapi
    assert {"type": "sam3", "name": "default", "URL": "hf://facebook/sam3/sam3.pt"} in samapi
    assert all(set(item) == {"type", "name", "URL"} for item in samapi)


# -- Hugging Face (mocked: no network) --------------------------------------------------


def _fake_hf(payload: bytes, calls: list[dict[str, Any]], failure: Exception | None = None, slow: bool = False) -> Any:
    def hf_hub_download(
        repo_id: str, filename: str, *, revision: str | None = None, local_dir: Any = None,
        tqdm_class: Any = None, **_: Any
    ) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, "revision": revision, "local_dir": Path(local_dir)})
        if failure is not None:
            raise failure
        bar = tqdm_class(total=len(payload), initial=0, desc=filename, unit="B", unit_scale=True)
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(payload)
        for _ in range(500 if slow else 1):
            bar.update(1)  # raises once cancelled
            time.sleep(0.01 if slow else 0)
        bar.close()
        return str(out)

    return hf_hub_download


def test_hf_download_lands_in_the_state_dir(
    make_registry: Any, monkeypatch: pytest.MonkeyPatch, checkpoint: bytes, state_dir: Path
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hf(checkpoint, calls))
    https = WeightsEntry(name="pinned", type="sam3", url="https://huggingface.co/facebook/sam3/resolve/abc123/sam3.pt")
    registry = make_registry([https])

    spec = registry.fetch("sam3", "default")
    assert spec.sha256 == sha(checkpoint) and spec.checkpoint.parent == state_dir / "weights" / "sam3"
    assert spec.checkpoint.read_bytes() == checkpoint and spec.source == "hf://facebook/sam3/sam3.pt"
    assert calls[0]["repo_id"] == "facebook/sam3" and calls[0]["filename"] == "sam3.pt"
    assert calls[0]["revision"] is None
    assert calls[0]["local_dir"].is_relative_to(state_dir / "weights" / "hf")
    assert not calls[0]["local_dir"].exists()  # the staging folder is cleaned up

    registry.fetch("sam3", "pinned")
    assert calls[1]["revision"] == "abc123"


def _response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/facebook/sam3"))


@pytest.mark.parametrize(
    ("failure", "advice"),
    [
        (hf_errors.GatedRepoError("Access to model facebook/sam3 is restricted.", response=_response(403)), True),
        (hf_errors.RepositoryNotFoundError("401 Client Error.", response=_response(401)), True),
        (hf_errors.HfHubHTTPError("403 Forbidden", response=_response(403)), True),
        (hf_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache."), False),
        (httpx.ConnectError("Name or service not known"), False),
    ],
    ids=["gated", "no-token", "forbidden", "offline", "network"],
)
def test_hf_failures_become_weights_unavailable(
    make_registry: Any, monkeypatch: pytest.MonkeyPatch, failure: Exception, advice: bool
) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hf(b"", [], failure))
    registry = make_registry([])
    registry.request("sam3", "default")
    state = settled(registry, "sam3", "default")
    assert isinstance(state, DownloadState) and state.error is not None
    assert state.error.code == "weights_unavailable" and state.error.field == "weights"
    message = state.error.message
    if advice:
        assert "SAM3 weights are gated" in message
        assert "request access at https://huggingface.co/facebook/sam3" in message
        assert "hf auth login" in message and "HF_TOKEN" in message
    else:
        assert "cannot be reached" in message


def test_hf_download_can_be_cancelled(make_registry: Any, monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hf(b"x" * 1000, [], slow=True))
    registry = make_registry([])
    downloading(registry, "sam3", "default")
    registry.cancel("sam3")
    state = settled(registry, "sam3", "default")
    assert isinstance(state, DownloadState) and state.error is not None and state.error.code == "weights_download_cancelled"
    assert files_in(state_dir / "weights" / "hf") == []
