"""The control side stays light: the daemon's loop and ``samwatch status`` import no torch, no
model library and no image codec, and a job's outcome crosses process boundaries as plain values."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from samwatch.atomic import now_iso
from samwatch.errors import JobCancelled, JobError
from samwatch.vocab import LoadSpec, Outcome

#: what the job side brings in; none of it may load with the control side
HEAVY = ("torch", "torchvision", "sam2", "sam3", "segment_anything", "mobile_sam", "transformers",
         "onnxruntime", "PIL", "tifffile", "av", "cv2", "openslide", "zarr", "skimage")

CONTROL_SIDE = (
    "samwatch.daemon", "samwatch.dispatch", "samwatch.outcomes", "samwatch.status", "samwatch.queueing",
    "samwatch.retries", "samwatch.discovery", "samwatch.executors.base", "samwatch.executors.dask",
    "samwatch.ledger", "samwatch.claims", "samwatch.watcher", "samwatch.status_view", "samwatch.input_facts",
    "samwatch.weights.registry", "samwatch.vocab", "samwatch.cli",
)


def _heavy_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_control_side_imports_no_model_or_codec_library() -> None:
    assert _heavy_after("\n".join(f"import {name}" for name in CONTROL_SIDE)) == []


def test_status_of_an_outbox_loads_no_model_or_codec_library(tmp_path: Path) -> None:
    state = tmp_path / "outbox" / "_samwatch"
    state.mkdir(parents=True)
    (state / "status.json").write_text(json.dumps({
        "state": "running", "version": "0.1.0", "instance": "gpu-1", "pid": 42, "updated": now_iso(),
        "heartbeat_seconds": 5, "device": "cpu", "queue": {"queued": 1, "waiting": 0},
        "current": {"job": "a", "stage": "automask", "percent": 50, "seconds": 1.0},
        "loaded_models": [], "downloads": [], "recent_failures": [], "config": {"error": None},
    }))
    code = (f"from samwatch.cli import main\nimport contextlib, io\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['status', '--outbox', {str(tmp_path / 'outbox')!r}]) == 0")
    assert _heavy_after(code) == []


def test_an_outcome_crosses_the_wire_as_plain_values() -> None:
    outcome = Outcome("done", features=3, seconds=1.5, summary="job a done",
                      result={"type": "FeatureCollection", "features": []}, extras={".preview.png": b"\x89PNG"})
    wire = outcome.to_wire()
    assert Outcome.from_wire(pickle.loads(pickle.dumps(wire))) == outcome
    failed = Outcome("failed", error=JobError("sidecar_invalid", "bad", field="prompts", file="a.yaml", line=3))
    back = Outcome.from_wire(json.loads(json.dumps(failed.to_wire())))
    assert back.error is not None and back.error.to_dict() == failed.error.to_dict()
    cancelled = Outcome.from_wire(Outcome("cancelled", error=JobCancelled()).to_wire())
    assert isinstance(cancelled.error, JobCancelled)
    waiting = Outcome.from_wire(json.loads(json.dumps(Outcome("waiting", waiting_for=("vit_t", "default")).to_wire())))
    assert waiting.waiting_for == ("vit_t", "default")


def test_a_load_spec_pickles_for_a_worker() -> None:
    spec = LoadSpec("vit_t", Path("/w/vit_t.pt"), "default", sha256="ab", source="https://x/vit_t.pt")
    assert pickle.loads(pickle.dumps(spec)) == spec
