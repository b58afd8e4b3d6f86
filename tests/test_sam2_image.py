"""The SAM2 image adapter against sam2's own SAM2ImagePredictor, with random hiera_t weights.

Encoding a 1024² input costs seconds on a CPU, so the adapter and the reference predictor each
encode the test image once per module; every other test decodes against those embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from skimage import data

from samwatch.errors import JobError
from samwatch.geometry import iou
from samwatch.models.base import Detection, RunContext
from samwatch.vocab import LoadSpec
from samwatch.models.sam2 import Adapter, sam2_config_for
from samwatch.sidecar import validate_sidecar
from support import placed
from tests.conftest import SAM2_TINY_CONFIG

IMAGE = np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256×256 RGB
KEY = "astronaut"
BOX = [60.0, 20.0, 180.0, 150.0]
POINTS = [[110.0, 70.0], [30.0, 200.0]]


def spec(checkpoint: Path, **kwargs: Any) -> LoadSpec:
    return LoadSpec(model_type="sam2_t", checkpoint=checkpoint, weights_name="t", **kwargs)


@pytest.fixture(scope="module")
def adapter(sam2_t_checkpoint: Path) -> Adapter:
    loaded = Adapter()
    loaded.setup(spec(sam2_t_checkpoint), torch.device("cpu"))
    return loaded


@pytest.fixture(scope="module")
def reference(sam2_t_checkpoint: Path) -> Any:
    """sam2's predictor, built and loaded the plain way, with the test image set."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_sam2(SAM2_TINY_CONFIG, None, device="cpu")
    model.load_state_dict(torch.load(sam2_t_checkpoint, weights_only=True)["model"])
    predictor = SAM2ImagePredictor(model)
    with torch.inference_mode():
        predictor.set_image(IMAGE)
    return predictor


@pytest.fixture(scope="module")
def low_res_logits(reference: Any) -> np.ndarray:
    """A real mask prompt: the 256×256 logits sam2 returns for the box."""
    _, _, logits = reference.predict(box=np.array(BOX), multimask_output=False)
    return logits[0]


def run(
    adapter: Adapter,
    prompts: list[dict[str, Any]],
    *,
    masks: list[np.ndarray | None] | None = None,
    batch: int = 1,
    key: str = KEY,
    **sidecar: Any,
) -> list[Detection]:
    ctx = RunContext(
        sidecar=validate_sidecar({"model": "sam2_t", "prompts": prompts, **sidecar}, name="t"),
        image=IMAGE,
        image_key=key,
        prompt_masks=masks or [],
        prompt_batch_size=batch,
    )
    return placed(adapter.run(ctx), IMAGE.shape[:2])


def reference_masks(reference: Any, multimask: bool, **prompt: Any) -> tuple[np.ndarray, np.ndarray]:
    masks, scores, _ = reference.predict(multimask_output=multimask, **prompt)
    return masks > 0, scores


# ------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("model_type", "source", "version", "config"),
    [
        ("sam2_t", "sam2.1_hiera_tiny.pt", None, "configs/sam2.1/sam2.1_hiera_t.yaml"),
        ("sam2_s", "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_small.pt", None,
         "configs/sam2/sam2_hiera_s.yaml"),
        ("sam2_bp", "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt", None,
         "configs/sam2.1/sam2.1_hiera_b+.yaml"),
        ("sam2_l", "facebook/SAM2.1-hiera-large", None, "configs/sam2.1/sam2.1_hiera_l.yaml"),
        ("sam2_l", "sam2.1_hiera_large.pt", "2", "configs/sam2/sam2_hiera_l.yaml"),
        ("sam2_bp", "lab_finetuned.pt", "2.1", "configs/sam2.1/sam2.1_hiera_b+.yaml"),
    ],
)
def test_sam2_config_for(model_type: str, source: str, version: str | None, config: str) -> None:
    assert sam2_config_for(model_type, source, version) == config


def test_setup_records_config_and_size(adapter: Adapter) -> None:
    assert adapter.config_used == SAM2_TINY_CONFIG  # the fixture file is named sam2.1_hiera_t_*.pt
    assert 30e6 * 4 < adapter.parameter_bytes() < 45e6 * 4  # hiera_t: about 39 M float32 parameters


def test_mislabelled_sam2_1_file_loads_with_sam2_1_config(sam2_t_checkpoint: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "sam2_hiera_tiny.pt"  # says SAM2.0, holds SAM2.1 tensors
    renamed.symlink_to(sam2_t_checkpoint)
    loaded = Adapter()
    loaded.setup(spec(renamed), torch.device("cpu"))
    assert loaded.config_used == SAM2_TINY_CONFIG


def test_explicit_config_is_not_second_guessed(sam2_t_checkpoint: Path) -> None:
    with pytest.raises(JobError) as caught:
        Adapter().setup(spec(sam2_t_checkpoint, config="configs/sam2/sam2_hiera_t.yaml"), torch.device("cpu"))
    assert caught.value.code == "weights_wrong_architecture"


def test_sam1_checkpoint_is_the_wrong_architecture(vit_t_checkpoint: Path) -> None:
    with pytest.raises(JobError) as caught:
        Adapter().setup(spec(vit_t_checkpoint), torch.device("cpu"))
    assert caught.value.code == "weights_wrong_architecture"
    assert "sam2_t" in caught.value.message


# ------------------------------------------------------------------------- prompts


def test_prompts_match_sam2_image_predictor(
    adapter: Adapter, reference: Any, low_res_logits: np.ndarray
) -> None:
    prompts: list[tuple[dict[str, Any], dict[str, Any], np.ndarray | None]] = [
        ({"bbox": BOX}, {"box": np.array(BOX)}, None),
        ({"points": POINTS, "point_labels": [1, 0]},
         {"point_coords": np.array(POINTS), "point_labels": np.array([1, 0])}, None),
        ({"bbox": BOX, "points": POINTS[:1]},
         {"box": np.array(BOX), "point_coords": np.array(POINTS[:1]), "point_labels": np.array([1])}, None),
        ({"bbox": BOX, "mask": "m.png"}, {"box": np.array(BOX), "mask_input": low_res_logits[None]}, low_res_logits),
        ({"mask": "m.png"}, {"mask_input": low_res_logits[None]}, low_res_logits),
    ]
    found = run(adapter, [p for p, _, _ in prompts], masks=[m for _, _, m in prompts])
    assert [d.prompt_idx for d in found] == list(range(len(prompts)))
    for detection, (_, direct, _) in zip(found, prompts):
        masks, scores = reference_masks(reference, False, **direct)
        assert detection.mask.dtype == bool and detection.mask.shape == IMAGE.shape[:2]
        assert iou(detection.mask, masks[0]) >= 0.99
        assert detection.score == pytest.approx(float(scores[0]), abs=1e-4)


def test_multimask_choices(adapter: Adapter, reference: Any) -> None:
    prompt = {"points": POINTS[:1]}
    every = run(adapter, [prompt], multimask_output=True)
    masks, scores = reference_masks(
        reference, True, point_coords=np.array(POINTS[:1]), point_labels=np.array([1])
    )
    assert [d.mask_idx for d in every] == [0, 1, 2]
    assert all(iou(d.mask, m) >= 0.99 for d, m in zip(every, masks))
    areas = [int(d.mask.sum()) for d in every]
    expected = {
        "Multi-mask (largest)": int(np.argmax(areas)),
        "Multi-mask (smallest)": int(np.argmin(areas)),
        "Multi-mask (best quality)": int(np.argmax(scores)),
    }
    for output_type, index in expected.items():
        (chosen,) = run(adapter, [prompt], output_type=output_type)
        assert chosen.mask_idx == index, output_type
        assert np.array_equal(chosen.mask, every[index].mask)


def test_batched_prompts_equal_one_at_a_time(
    adapter: Adapter, low_res_logits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    boxes = [[10.0 + 20 * i, 15.0, 120.0 + 20 * i, 140.0] for i in range(4)]
    prompts = (
        [{"bbox": box} for box in boxes]
        + [{"points": [[40.0 + 30 * i, 60.0], [200.0, 200.0]], "point_labels": [1, 0]} for i in range(2)]
        + [{"bbox": BOX, "mask": "m.png"}] * 2
    )
    masks = [None] * 6 + [low_res_logits, -low_res_logits]
    calls = count_calls(monkeypatch, adapter.predictor, "predict")
    one_by_one = run(adapter, prompts, masks=masks, batch=1, multimask_output=True)
    assert len(calls) == 8
    batched = run(adapter, prompts, masks=masks, batch=4, multimask_output=True)
    assert len(calls) == 8 + 3  # the four boxes, the two point prompts, the two mask prompts
    assert [(d.prompt_idx, d.mask_idx) for d in batched] == [(d.prompt_idx, d.mask_idx) for d in one_by_one]
    for a, b in zip(batched, one_by_one):
        assert iou(a.mask, b.mask) >= 0.99
        assert a.score == pytest.approx(b.score, abs=1e-4)


def test_prompt_outside_the_image_fails_before_encoding(adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, adapter.predictor, "set_image")
    with pytest.raises(JobError) as caught:
        run(adapter, [{"bbox": [0, 0, 300, 100]}], key="never-encoded")
    assert caught.value.code == "prompt_out_of_bounds"
    assert calls == []


# ------------------------------------------------------------------------- embeddings


def test_embedding_is_reused_across_jobs(adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run(adapter, [{"bbox": BOX}])
    predictor = adapter.predictor
    cached = predictor._features
    encoded: list[tuple[int, ...]] = []

    def encode_other(image: np.ndarray) -> None:
        """Stands in for a second image's (seconds-long) encoding: same shapes, other values."""
        encoded.append(image.shape)
        predictor._features = {
            "image_embed": torch.zeros_like(cached["image_embed"]),
            "high_res_feats": [torch.zeros_like(f) for f in cached["high_res_feats"]],
        }
        predictor._orig_hw = [image.shape[:2]]
        predictor._is_image_set = True

    monkeypatch.setattr(predictor, "set_image", encode_other)
    assert mask_of(run(adapter, [{"bbox": BOX}])) == mask_of(first)  # same key: nothing encoded
    assert encoded == []
    other = run(adapter, [{"bbox": BOX}], key="other")
    assert encoded == [IMAGE.shape]
    assert mask_of(other) != mask_of(first)
    again = run(adapter, [{"bbox": BOX}])  # back to the first image: its cached embedding
    assert encoded == [IMAGE.shape]
    assert mask_of(again) == mask_of(first)


def test_video_mode_is_delegated(adapter: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    import samwatch.models.sam2_video as sam2_video

    tracked = [Detection(mask=np.zeros((2, 2), bool), score=1.0, frame=0, obj_id=1)]
    seen: list[Any] = []
    monkeypatch.setattr(sam2_video, "track", lambda adapter, ctx: seen.append(adapter) or tracked)
    sidecar = validate_sidecar({"model": "sam2_t", "video": {"objects": {0: [{"obj_id": 1, "bbox": BOX}]}}}, name="t")
    assert adapter.run(RunContext(sidecar=sidecar, image=None, image_key="video")) is tracked
    assert seen == [adapter]


# ------------------------------------------------------------------------- helpers


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def mask_of(detections: list[Detection]) -> bytes:
    (detection,) = detections
    return np.packbits(detection.mask).tobytes()
