"""SAM / MobileSAM through samwatch's real loader and job pipeline vs the upstream predictor."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samwatch.config import Config
from samwatch.errors import JobError
from samwatch.geometry import iou, rasterize
from samwatch.jobs import JobRunner
from samwatch.models.base import RunContext
from samwatch.vocab import LoadSpec
from samwatch.models.pool import ModelPool
from samwatch.weights.registry import WeightsRegistry
from samwatch.models.sam1 import Adapter, build_predictor
from samwatch.outbox import JobOutputs
from samwatch.sidecar import validate_sidecar
from samwatch.vocab import JobTicket, Progress
from support import coins, placed

PROMPTS = [
    {"bbox": [40, 40, 120, 110]},
    {"points": [[200, 150], [30, 30]], "point_labels": [1, 0]},
    {"bbox": [150, 50, 260, 160], "points": [[200, 100]]},
    {"bbox": [250, 180, 360, 290]},
]


def run(adapter: Adapter, ctx: RunContext) -> list:
    return placed(adapter.run(ctx), ctx.image.shape[:2])


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.repeat(coins()[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def adapter(vit_t_checkpoint: Path) -> Adapter:
    adapter = Adapter()
    adapter.setup(LoadSpec("vit_t", vit_t_checkpoint, "test"), torch.device("cpu"))
    return adapter


def test_geojson_matches_the_direct_predictor(tmp_path: Path, vit_t_checkpoint: Path, rgb: np.ndarray) -> None:
    """The whole job pipeline, polygons rasterised back, vs SamPredictor.predict: IoU >= 0.99."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.fromarray(coins()).save(inbox / "c.png")
    (inbox / "c.yaml").write_text(yaml.safe_dump({"model": "vit_t", "prompts": PROMPTS}))
    config = Config(inbox=inbox, outbox=tmp_path / "outbox", state_dir=tmp_path / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    registry = WeightsRegistry(config.weights, config.state_dir)
    runner = JobRunner(config, registry, ModelPool(torch.device("cpu"), config.models), prompt_batch_size=1)
    outputs = JobOutputs(config.outbox, "c")
    outcome = runner.run(JobTicket("c", "c.yaml", "c.png", "sha", "v1"), Progress(outputs, threading.Event()))
    assert outcome.state == "done", outcome.error
    features = outcome.result["features"]
    direct = build_predictor("vit_t", None)
    direct.model.load_state_dict(torch.load(vit_t_checkpoint, weights_only=True))
    direct.set_image(rgb)
    for index, prompt in enumerate(PROMPTS):
        masks, _, _ = direct.predict(
            point_coords=np.array(prompt["points"], dtype=np.float32) if "points" in prompt else None,
            point_labels=np.array(prompt.get("point_labels", [1] * len(prompt.get("points", [])))) if "points" in prompt else None,
            box=np.array(prompt["bbox"], dtype=np.float32) if "bbox" in prompt else None,
            multimask_output=False,
        )
        ours = [f for f in features if f["properties"]["prompt_idx"] == index]
        expected = masks[0]
        if not expected.any():
            assert not ours
            continue
        assert len(ours) == 1
        back = rasterize(ours[0]["geometry"], expected.shape)
        assert iou(back, expected) >= 0.99, index


def test_batched_decoding_equals_one_by_one(adapter: Adapter, rgb: np.ndarray) -> None:
    sidecar = validate_sidecar({"model": "vit_t", "prompts": [{"bbox": b} for b in ([10, 10, 80, 90], [100, 40, 200, 150], [220, 30, 300, 120], [50, 150, 150, 280], [200, 200, 370, 300])]}, name="x")
    single = run(adapter, RunContext(sidecar=sidecar, image=rgb, image_key="k", prompt_batch_size=1))
    batched = run(adapter, RunContext(sidecar=sidecar, image=rgb, image_key="k", prompt_batch_size=4))
    assert [d.prompt_idx for d in single] == [d.prompt_idx for d in batched]
    for a, b in zip(single, batched):
        assert iou(a.mask, b.mask) >= 0.99
        assert abs(a.score - b.score) < 1e-3


def test_embedding_is_reused_for_an_unchanged_image(adapter: Adapter, rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = adapter.predictor.set_image
    monkeypatch.setattr(adapter.predictor, "set_image", lambda image: (calls.append(1), original(image)))
    first = validate_sidecar({"prompts": [{"bbox": [10, 10, 80, 90]}]}, name="a")
    second = validate_sidecar({"prompts": [{"bbox": [100, 40, 200, 150]}]}, name="b")
    run(adapter, RunContext(sidecar=first, image=rgb, image_key="img-A"))
    run(adapter, RunContext(sidecar=second, image=rgb, image_key="img-A"))
    run(adapter, RunContext(sidecar=second, image=rgb[::-1].copy(), image_key="img-B"))
    run(adapter, RunContext(sidecar=first, image=rgb, image_key="img-A"))  # restored from the cache
    assert len(calls) == 2


@pytest.mark.parametrize("choice, count", [("Single Mask", 1), ("Multi-mask (all)", 3), ("Multi-mask (best quality)", 1), ("Multi-mask (largest)", 1), ("Multi-mask (smallest)", 1)])
def test_mask_choices(adapter: Adapter, rgb: np.ndarray, choice: str, count: int) -> None:
    sidecar = validate_sidecar({"prompts": [{"bbox": [40, 40, 120, 110]}], "output_type": choice}, name="x")
    detections = run(adapter, RunContext(sidecar=sidecar, image=rgb, image_key="k"))
    assert len(detections) == count
    if choice != "Single Mask":
        every = run(adapter, RunContext(sidecar=validate_sidecar({"prompts": [{"bbox": [40, 40, 120, 110]}], "multimask_output": True}, name="y"), image=rgb, image_key="k"))
        areas = [d.mask.sum() for d in every]
        if choice.endswith("(largest)"):
            assert detections[0].mask.sum() == max(areas)
        if choice.endswith("(smallest)"):
            assert detections[0].mask.sum() == min(areas)
        if choice.endswith("(best quality)"):
            assert detections[0].score == max(d.score for d in every)


def test_mask_prompt_changes_the_result(adapter: Adapter, rgb: np.ndarray) -> None:
    from samwatch.prompts import to_low_res_logits

    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[50:100, 50:100] = 1
    logits = to_low_res_logits(mask, rgb.shape[:2], where="m", field="f", sidecar="s")
    assert logits.shape == (256, 256) and logits.max() == 10
    sidecar = validate_sidecar({"prompts": [{"bbox": [40, 40, 120, 110], "mask": "m.png"}]}, name="x")
    plain = run(adapter, RunContext(sidecar=validate_sidecar({"prompts": [{"bbox": [40, 40, 120, 110]}]}, name="p"), image=rgb, image_key="k"))
    masked = run(adapter, RunContext(sidecar=sidecar, image=rgb, image_key="k", prompt_masks=[logits]))
    assert not np.array_equal(plain[0].mask, masked[0].mask) or plain[0].score != masked[0].score


def test_wrong_architecture_and_unsafe_checkpoints_are_refused(tmp_path: Path, sam2_t_checkpoint: Path) -> None:
    with pytest.raises(JobError) as err:
        Adapter().setup(LoadSpec("vit_t", sam2_t_checkpoint, "wrong", source="sam2.pt"), torch.device("cpu"))
    assert err.value.code == "weights_wrong_architecture" and "vit_t" in err.value.message
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, evil)
    with pytest.raises(JobError) as err:
        Adapter().setup(LoadSpec("vit_t", evil, "evil"), torch.device("cpu"))
    assert err.value.code == "weights_unsafe"
    assert not marker.exists()


def test_vit_b_loads_through_segment_anything(tmp_path: Path) -> None:
    """The SAM (not MobileSAM) builder and loader path, without the 18 s vit_b encoder run."""
    torch.manual_seed(0)
    path = tmp_path / "vit_b.pt"
    torch.save(build_predictor("vit_b", None).model.state_dict(), path)
    adapter = Adapter()
    adapter.setup(LoadSpec("vit_b", path, "b"), torch.device("cpu"))
    assert type(adapter.predictor).__module__.startswith("segment_anything")
    assert adapter.parameter_bytes() > 300e6


def test_an_image_too_thin_for_sam_is_refused_before_encoding(adapter: Adapter) -> None:
    sidecar = validate_sidecar({"prompts": [{"bbox": [0, 0, 50, 1]}]}, name="t")
    with pytest.raises(JobError) as caught:
        adapter.run(RunContext(sidecar=sidecar, image=np.zeros((1, 100_000, 3), np.uint8), image_key="thin"))
    assert caught.value.code == "image_shape_unsupported"
