"""What bounds a job's memory and time: masks cropped to their objects, batches sized to
limits.max_job_memory, big YAML parsed in a child process, and a daemon that gives back what a
job used."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from samwatch import memory
from samwatch.errors import JobError
from samwatch.geometry.outline import mask_to_geometry
from samwatch.job import pipeline
from samwatch.models import automask, sam1
from samwatch.models.base import Detection, RunContext
from samwatch.models.budget import DECODER_BYTES_PER_PROMPT, MiB, automask_batch, prompt_batch
from samwatch.sidecars.schema import validate_sidecar
from samwatch.vocab import JobTicket, LoadSpec, Outcome
from support import DaemonProcess, finished, read_json, save_image, wait_for, write_config, write_sidecar


def test_a_cropped_mask_traces_to_the_same_polygon() -> None:
    mask = np.zeros((300, 400), bool)
    mask[40:90, 120:200] = True
    mask[60:70, 150:160] = False  # a hole
    detection = Detection(mask=mask, score=0.5, origin=(1000, 2000), scale=2.0)
    cropped = detection.cropped()
    assert cropped.mask.shape == (50, 80) and cropped.origin == (1240, 2080)
    assert not np.shares_memory(cropped.mask, mask)  # the full frame can be freed
    assert mask_to_geometry(cropped.mask, offset=cropped.origin, scale=2.0) == mask_to_geometry(
        mask, offset=(1000, 2000), scale=2.0
    )


def test_an_empty_mask_crops_to_one_empty_pixel() -> None:
    cropped = Detection(mask=np.zeros((50, 60), bool), score=0.1).cropped()
    assert cropped.mask.shape == (1, 1) and not cropped.mask.any()
    assert mask_to_geometry(cropped.mask) is None


def test_prompt_batches_shrink_to_the_job_memory() -> None:
    budget = 1024 * MiB
    assert prompt_batch(32, (1024, 1024), 3, budget) == (budget - 32 * MiB) // (DECODER_BYTES_PER_PROMPT + 36 * MiB) == 15
    assert prompt_batch(4, (256, 256), 3, budget) == 4
    assert prompt_batch(32, (4096, 4096), 1, budget) == 4  # 30 + 192 MiB a prompt
    assert prompt_batch(32, (30000, 30000), 3, None) == 32  # no limit set


def test_a_prompt_job_that_cannot_fit_one_prompt_is_refused_with_its_code() -> None:
    with pytest.raises(JobError) as caught:
        prompt_batch(1, (12000, 12000), 3, 1024 * MiB)
    assert caught.value.code == "job_memory_exceeded" and caught.value.field == "limits.max_job_memory"
    assert "limits.max_job_memory" in caught.value.message and caught.value.details["planned_bytes"] > 1024 * MiB


def test_automask_point_batches_shrink_and_refuse_the_same_way() -> None:
    assert automask_batch(64, 1024 * 1024, 3, 1024 * MiB) == 31  # 976 MiB left at 30.75 MiB a point
    assert automask_batch(64, 1024 * 1024, 3, None) == 64
    with pytest.raises(JobError) as caught:
        automask_batch(1, 1024 * 1024, 3, 32 * MiB)
    assert caught.value.code == "job_memory_exceeded"


def test_an_automask_refused_for_memory_decodes_nothing(vit_t_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = sam1.Adapter()
    adapter.setup(LoadSpec("vit_t", vit_t_checkpoint, "t"), torch.device("cpu"))
    image = np.zeros((64, 64, 3), np.uint8)
    sidecar = validate_sidecar({"automask": {"points_per_side": 2}}, name="t")
    monkeypatch.setattr(adapter.predictor, "set_image", lambda *args: pytest.fail("encoded"))
    monkeypatch.setattr(automask._Sam1Hooks, "_predict_points", lambda *args: pytest.fail("decoded"))
    with pytest.raises(JobError) as caught:
        list(adapter.run(RunContext(sidecar=sidecar, image=image, image_key="k", memory_budget=MiB)))
    assert caught.value.code == "job_memory_exceeded"


def test_a_big_yaml_text_parsed_in_a_child_is_what_yaml_gives() -> None:
    import yaml

    from samwatch.yaml_child import CHILD_MIN_BYTES, load_yaml

    text = "prompts:\n" + "".join(f"- {{bbox: [{i}, 1, {i + 5}, 9.5], label: c{i}}}\n" for i in range(4000))
    assert len(text) > CHILD_MIN_BYTES
    assert load_yaml(text, yaml.SafeLoader) == yaml.safe_load(text)
    dated = "when: 2024-01-01\n#" + "x" * CHILD_MIN_BYTES  # JSON cannot carry a date: parsed here
    assert load_yaml(dated, yaml.SafeLoader) == yaml.safe_load(dated)


class HoldingRunner:
    """A job that holds ``hold`` bytes (touched) while on the device: JobRunner's three stages."""

    def __init__(self, hold: int) -> None:
        self.hold = hold

    def prepare(self, ticket, progress):  # noqa: ANN001, ANN201
        return object()

    def infer(self, prepared):  # noqa: ANN001, ANN201
        held = np.ones(self.hold, np.uint8)
        yield from ()
        del held

    def finish(self, prepared, detections):  # noqa: ANN001, ANN201
        list(detections)
        return Outcome("done", result={})


def test_only_a_job_that_grew_the_process_pays_for_giving_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full garbage collection walks every object (a quarter second with torch loaded): a job
    that grew the process by less than GIVE_BACK_MIN_BYTES skips it, one that grew it more does not."""
    given: list[str] = []
    monkeypatch.setattr(pipeline, "give_back", lambda: given.append("collected"))
    outcomes: list[str] = []
    for name, hold in (("small", 1 * memory.MiB), ("big", 4 * memory.GIVE_BACK_MIN_BYTES)):
        jobs = pipeline.JobPipeline()  # one job at a time: no other job's memory in its window
        jobs.submit(HoldingRunner(hold), JobTicket(name, f"{name}.yaml", f"{name}.png", "sha", "v1"),
                    lambda *args: None, lambda ticket, outcome: outcomes.append(ticket.job_id))
        jobs.close()
    assert outcomes == ["small", "big"]
    assert given == ["collected"]  # the big job's only


@pytest.mark.subprocess  # the RSS of a real daemon process is what is measured
def test_a_daemon_holds_what_an_automask_needs_and_gives_it_back(
    tmp_path: Path, vit_t_checkpoint: Path, encoder_cache: Path
) -> None:
    """Through a running daemon (ONNX Runtime encoder and decoder, as by default): a 1024² automask
    in batches of 64 points stays within 1 GiB over the idle level with the model loaded, and the
    daemon is back within 256 MiB of that level soon after the job. The peak is one batch's (the
    encoder's run, or a batch's decoding and masks), so 16² points reach it as the bar's 32² do,
    in a quarter of the time; bench/bench_memory.py measures 32²."""
    state = tmp_path / "state"
    state.mkdir()
    encoder_cache.mkdir(parents=True, exist_ok=True)
    (state / "encoders").symlink_to(encoder_cache)  # the session's exports: no second export here
    config = write_config(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}],
                          models={"accelerate": {"cpu": ["onnxruntime"]}})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    rng = np.random.default_rng(0)
    save_image(inbox / "warm.png", rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    write_sidecar(inbox / "warm.yaml", {"image": "warm.png", "prompts": [{"bbox": [10, 10, 120, 90]}]})
    daemon = DaemonProcess(config)
    process = psutil.Process(daemon.proc.pid)
    wait_for(lambda: finished(outbox, "warm"), 600, what="the warm-up job (model loaded, exports made)")
    idle = settled_rss(process)

    peak = PeakSampler(process)
    save_image(inbox / "big.png", rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
    write_sidecar(inbox / "big.yaml", {"image": "big.png", "automask": {"points_per_side": 16, "points_per_batch": 64}})
    wait_for(lambda: finished(outbox, "big"), 600, what="the automask job")
    peak.stop()
    assert (read_json(outbox / "big.progress.json") or {}).get("state") == "done", daemon.log()[-3000:]
    over = (peak.peak - idle) / MiB
    assert over <= 1024, f"peak {over:.0f} MiB over the idle level"
    wait_for(lambda: process.memory_info().rss - idle <= 256 * MiB, 20,
             what=f"RSS back within 256 MiB of idle ({idle / MiB:.0f} MiB)")
    workers = wait_for(lambda: (read_json(outbox / "_samwatch" / "status.json") or {}).get("workers"), 10)
    assert workers[0]["last_job_peak_mb"] >= workers[0]["rss_mb"] * 0.5
    assert daemon.stop() == 0


def settled_rss(process: psutil.Process, tolerance: int = 8 * MiB) -> int:
    """The RSS once it stops moving (the daemon trims after each job)."""
    last = process.memory_info().rss
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = process.memory_info().rss
        if abs(now - last) <= tolerance:
            return now
        last = now
    return last


class PeakSampler:
    """Another process's highest RSS, sampled every 20 ms until ``stop``."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.peak = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
