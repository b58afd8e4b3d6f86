"""SAM3 for real: the 841M-parameter image model through samwatch's Adapter on the CPU.

The random-weight run takes 1-2 minutes and several GB of RAM. Random weights score every
query near sigmoid(0) × sigmoid(0) = 0.25, so the fixture biases the two heads that make the
score (see ``bias_towards_detections``) so that some queries, not all, clear the threshold.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from samwatch.models.base import LoadSpec, RunContext
from samwatch.models.sam3 import Adapter, build_image_model
from samwatch.models.sam3_device import on_device
from samwatch.sidecar import Sidecar

pytest.importorskip("sam3")
skimage_data = pytest.importorskip("skimage.data")

THRESHOLD = 0.9


def bias_towards_detections(model: torch.nn.Module) -> None:
    """Score = sigmoid(dot-product logit) × sigmoid(presence logit).

    The presence head's last bias is pushed to its clamp (+10: presence ≈ 1); the text side
    of the dot product is made a constant vector and the query side's weights scaled up, so
    the logits spread widely around 0 and part of the 200 queries land above THRESHOLD.
    """
    with torch.no_grad():
        model.transformer.decoder.presence_token_head.layers[-1].bias.fill_(10.0)
        scoring = model.dot_prod_scoring
        scoring.prompt_proj.weight.zero_()
        scoring.prompt_proj.bias.fill_(1.0)
        scoring.hs_proj.weight.mul_(20.0)


@pytest.fixture(scope="module")
def random_sam3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights saved as the official sam3.pt lays them out: {"model": {"detector.*"}}."""
    torch.manual_seed(0)
    with on_device(torch.device("cpu")):
        model = build_image_model()
    bias_towards_detections(model)
    path = tmp_path_factory.mktemp("weights") / "sam3_random.pt"
    torch.save({"model": {"detector." + key: value for key, value in model.state_dict().items()}}, path)
    del model
    gc.collect()
    return path


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Samples this process's RSS every 0.1 s; yields a one-item list that ends as the peak."""
    peak = [0]
    done = threading.Event()
    process = psutil.Process()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def timed_run(adapter: Adapter, ctx: RunContext) -> tuple[list, float]:
    start = time.perf_counter()
    detections = adapter.run(ctx)
    return detections, time.perf_counter() - start


@pytest.mark.slow
def test_random_weights_through_the_adapter_on_cpu(random_sam3_checkpoint: Path) -> None:
    image = np.repeat(skimage_data.coins()[..., None], 3, axis=2)  # 303×384: not square
    spec = LoadSpec(model_type="sam3", checkpoint=random_sam3_checkpoint, weights_name="random",
                    source=str(random_sam3_checkpoint))
    sidecar = Sidecar.model_validate({"model": "sam3", "text": "coin", "confidence_threshold": THRESHOLD})
    ctx = RunContext(sidecar=sidecar, image=image, image_key="coins")
    adapter = Adapter()
    with peak_rss() as peak:
        start = time.perf_counter()
        adapter.setup(spec, torch.device("cpu"))
        setup_seconds = time.perf_counter() - start
        first, encode_and_prompt = timed_run(adapter, ctx)
        again, prompt_only = timed_run(adapter, ctx)  # the embedding comes from the cache
    print(
        f"\nSAM3 on CPU ({torch.get_num_threads()} threads): setup {setup_seconds:.1f} s, "
        f"encode {encode_and_prompt - prompt_only:.1f} s, text prompt {prompt_only:.1f} s, "
        f"peak RSS {peak[0] / 2**30:.2f} GiB, {len(first)} of 200 queries kept"
    )
    assert 0 < len(first) < 200
    assert all(d.mask.shape == image.shape[:2] and d.mask.dtype == bool for d in first)
    assert all(d.score >= THRESHOLD and d.label == "coin" for d in first)
    assert any(d.mask.any() for d in first)
    assert [d.score for d in again] == pytest.approx([d.score for d in first], abs=1e-5)
    assert prompt_only < encode_and_prompt / 2


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not os.environ.get("SAMWATCH_SAM3_CHECKPOINT"),
    reason="needs CUDA and SAMWATCH_SAM3_CHECKPOINT pointing to the real sam3.pt",
)
def test_real_checkpoint_finds_cells_on_gpu() -> None:
    checkpoint = Path(os.environ["SAMWATCH_SAM3_CHECKPOINT"])
    image = np.repeat(skimage_data.cell()[..., None], 3, axis=2)
    spec = LoadSpec(model_type="sam3", checkpoint=checkpoint, weights_name="default", source=str(checkpoint))
    sidecar = Sidecar.model_validate({"model": "sam3", "text": "cell", "confidence_threshold": 0.3})
    adapter = Adapter()
    adapter.setup(spec, torch.device("cuda"))
    detections = adapter.run(RunContext(sidecar=sidecar, image=image, image_key="cell"))
    assert len(detections) >= 1
    assert all(d.mask.shape == image.shape[:2] and d.score >= 0.3 for d in detections)
