"""Accelerated image encoders and mask decoders against eager fp32: masks, fallback, provenance.

Random weights give logits within ±0.05 of 0, where any rounding flips pixels; the mask
decoder's hypernetwork output layers are scaled ×200 (conftest ``conditioned_vit_t``) so
|logits| ≫ 0 away from real boundaries (the masks are then as well-conditioned as trained
ones), and IoU is meaningful. The ONNX exports are made once per session into one cache
folder (``encoder_cache``), as the daemon's state_dir.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from loguru import logger
from PIL import Image

from samwatch.config import Config, ModelSettings
from samwatch.geometry import iou
from samwatch.jobs import JobRunner
from samwatch.models.accel import Accelerator, onnx_runtime, torch_paths
from samwatch.models.base import RunContext
from samwatch.vocab import LoadSpec
from samwatch.models.pool import ModelPool
from samwatch.weights.registry import WeightsRegistry
from samwatch.outbox import JobOutputs
from samwatch.sidecar import validate_sidecar
from samwatch.vocab import JobTicket, Progress
from support import coins

BOXES = [[40, 40, 120, 110], [150, 50, 260, 160], [250, 180, 360, 290], [10, 150, 140, 290], [200, 20, 380, 140]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapter(checkpoint: Path, steps: tuple[str, ...], cache: Path | None):
    pool = ModelPool(torch.device("cpu"), ModelSettings(accelerate={"cpu": steps}), cache_dir=cache)
    # The registry's sha256, so that jobs below find this session's export in the cache.
    return pool.get(LoadSpec("vit_t", checkpoint, "default", sha256=_sha256(checkpoint)))


def _masks(adapter, image: np.ndarray) -> list[np.ndarray]:
    sidecar = validate_sidecar({"model": "vit_t", "prompts": [{"bbox": b} for b in BOXES]}, name="x")
    return [d.mask for d in adapter.run(RunContext(sidecar=sidecar, image=image, image_key=f"{id(adapter)}"))]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.repeat(coins()[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def eager(conditioned_vit_t: Path, rgb: np.ndarray) -> tuple[list[np.ndarray], torch.Tensor]:
    """Eager fp32's masks and embedding: the reference every fast path must meet."""
    adapter = _adapter(conditioned_vit_t, (), None)
    assert adapter.encoder_path == "eager"
    return _masks(adapter, rgb), adapter.predictor.features


def _assert_equivalent(eager, fast, image: np.ndarray) -> None:
    expected, embedding_eager = eager
    got, embedding_fast = _masks(fast, image), fast.predictor.features
    scale = embedding_eager.abs().max().item()
    assert (embedding_fast - embedding_eager).abs().max().item() <= 1e-4 * scale
    assert len(got) == len(expected) == len(BOXES)
    for a, b in zip(expected, got):
        assert a.mean() > 0.01  # well-conditioned: real masks, not empty ones
        assert iou(a, b) >= 0.98


def test_onnxruntime_encoder_matches_eager(eager, conditioned_vit_t: Path, encoder_cache: Path, rgb: np.ndarray) -> None:
    fast = _adapter(conditioned_vit_t, ("onnxruntime",), encoder_cache)
    _assert_equivalent(eager, fast, rgb)
    assert fast.encoder_path == "onnxruntime"
    assert [p.name for p in encoder_cache.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_sdpa_encoder_matches_eager(eager, conditioned_vit_t: Path, rgb: np.ndarray) -> None:
    fast = _adapter(conditioned_vit_t, ("sdpa",), None)
    _assert_equivalent(eager, fast, rgb)
    assert fast.encoder_path == "sdpa"


def test_sdpa_matches_sam_vit_attention_with_relative_positions() -> None:
    """SAM ViT-B/L/H attention (decomposed relative positions) as SDPA: the same function."""
    from segment_anything.modeling.image_encoder import Attention

    torch.manual_seed(0)
    attention = Attention(64, num_heads=4, use_rel_pos=True, input_size=(14, 14)).eval()
    with torch.no_grad():
        attention.rel_pos_h.normal_()
        attention.rel_pos_w.normal_()
        x = torch.randn(2, 14, 14, 64)
        expected = attention(x)
        torch_paths.use_sdpa(attention)
        got = attention(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def ort_sam2_t(sam2_t_checkpoint: Path, encoder_cache: Path, rgb: np.ndarray):
    from samwatch.models.sam2 import Adapter

    adapter = Adapter()
    spec = LoadSpec("sam2_t", sam2_t_checkpoint, "default", sha256=_sha256(sam2_t_checkpoint))
    adapter.setup(spec, torch.device("cpu"))
    adapter.accelerate(Accelerator(("onnxruntime",), torch.device("cpu"), encoder_cache), spec)
    with torch.inference_mode():
        adapter.predictor.set_image(rgb)
    return adapter


def test_onnxruntime_sam2_encoder_matches_eager(ort_sam2_t) -> None:
    """SAM2's encoder returns a dict of lists (features, positions, FPN levels): all rebuilt."""
    adapter = ort_sam2_t
    image = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        expected, got = adapter.model.image_encoder.eager(image), adapter.model.image_encoder(image)
    assert adapter.encoder_path == "onnxruntime"
    state = adapter.model.state_dict()  # the wrapper is invisible: a copy of the model loads it
    assert not any(".eager." in key for key in state)
    adapter.model.load_state_dict(state)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)


def _job(tmp_path: Path, checkpoint: Path, cache: Path) -> tuple[dict, list[str]]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.fromarray(coins()).save(inbox / "c.png")
    (inbox / "c.yaml").write_text(yaml.safe_dump({"model": "vit_t", "prompts": [{"bbox": b} for b in BOXES]}))
    config = Config(inbox=inbox, outbox=tmp_path / "outbox", state_dir=tmp_path / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": str(checkpoint)}])
    pool = ModelPool(torch.device("cpu"), config.models, cache_dir=cache)
    runner = JobRunner(config, WeightsRegistry(config.weights, config.state_dir), pool, prompt_batch_size=1)
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        outputs = JobOutputs(config.outbox, "c")
        outcome = runner.run(JobTicket("c", "c.yaml", "c.png", "sha", "v1"), Progress(outputs, threading.Event()))
    finally:
        logger.remove(sink)
    assert outcome.state == "done", outcome.error
    return outcome.result, warnings


def test_result_names_the_encoder_path(tmp_path: Path, conditioned_vit_t: Path, encoder_cache: Path) -> None:
    result, warnings = _job(tmp_path, conditioned_vit_t, encoder_cache)  # the default: onnxruntime on CPU
    assert result["samwatch"]["image_encoder"] == "onnxruntime"
    assert result["samwatch"]["mask_decoder"] == "onnxruntime"
    assert len(result["features"]) == len(BOXES)
    assert warnings == []


def test_a_broken_export_falls_back_to_eager_with_one_warning(tmp_path: Path, conditioned_vit_t: Path) -> None:
    cache = tmp_path / "encoders"
    key = onnx_runtime.cache_key("encoder", "vit_t", _sha256(conditioned_vit_t), (1, 3, 1024, 1024))
    (cache / key).mkdir(parents=True)
    (cache / key / onnx_runtime.MODEL_FILE).write_bytes(b"not an onnx model")
    (cache / key / onnx_runtime.LAYOUT_FILE).write_text(json.dumps({"layout": "broken"}))
    result, warnings = _job(tmp_path, conditioned_vit_t, cache)
    assert result["samwatch"]["image_encoder"] == "eager"
    assert len(result["features"]) == len(BOXES)
    assert len(warnings) == 1 and "onnxruntime" in warnings[0] and "eager" in warnings[0]


def test_a_failing_fast_path_falls_back_on_the_call(rgb: np.ndarray, conditioned_vit_t: Path, eager) -> None:
    """A runtime error on an image (say a missing GPU kernel) is answered by eager, for good."""
    fast = _adapter(conditioned_vit_t, ("sdpa",), None)
    encoder = fast.predictor.model.image_encoder

    def broken(image: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel unavailable")

    encoder._fast = broken
    _assert_equivalent(eager, fast, rgb)
    assert fast.encoder_path == "eager" and "kernel unavailable" in encoder.failure


def test_without_a_cache_folder_onnxruntime_stays_eager() -> None:
    encoder = torch.nn.Conv2d(3, 4, 3)
    wrapped = Accelerator(("onnxruntime",), torch.device("cpu"), None).wrap(
        encoder, model_type="vit_t", weights_sha="ab" * 32, input_shape=(1, 3, 8, 8))
    assert wrapped.path == "eager" and wrapped.failure is None


def test_accelerate_settings_are_checked() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="onnxruntime"):
        ModelSettings(accelerate={"cuda": ["onnxruntime"]})
    with pytest.raises(ValidationError, match="bf16 and fp16"):
        ModelSettings(accelerate={"cuda": ["bf16", "fp16"]})
    assert ModelSettings().accelerate.steps_for("cpu") == ("onnxruntime",)


# The mask decoder on CPU (SAM/MobileSAM): ``predict_masks`` in ONNX Runtime behind
# ``model.mask_decoder``, compared with the eager decoder on the same embedding.


@pytest.fixture(scope="module")
def ort_vit_t(conditioned_vit_t: Path, encoder_cache: Path, rgb: np.ndarray):
    adapter = _adapter(conditioned_vit_t, ("onnxruntime",), encoder_cache)
    adapter.predictor.set_image(rgb)
    return adapter


def _both_decoders(call, model: torch.nn.Module, attribute: str = "mask_decoder"):
    """``call()``'s (masks, scores, low-res logits) with the ONNX decoder, then with eager."""
    wrapped = getattr(model, attribute)
    got = [np.asarray(out) for out in call()]
    assert wrapped.path == "onnxruntime"
    setattr(model, attribute, wrapped.eager)
    try:
        expected = [np.asarray(out) for out in call()]
    finally:
        setattr(model, attribute, wrapped)
    return expected, got


def _assert_logits_alike(expected, got) -> None:
    (masks_e, scores_e, logits_e), (masks_g, scores_g, logits_g) = expected, got
    assert masks_g.shape == masks_e.shape and logits_g.shape == logits_e.shape
    np.testing.assert_allclose(logits_g, logits_e, atol=1e-4 * np.abs(logits_e).max())
    np.testing.assert_allclose(scores_g, scores_e, atol=1e-4)


def _assert_decoded_alike(expected, got) -> None:
    _assert_logits_alike(expected, got)
    masks_e, masks_g, logits_e = expected[0], got[0], expected[2]
    assert np.abs(logits_e).max() > 5  # well-conditioned: logits far from the 0 threshold
    flat_e, flat_g = masks_e.reshape(-1, *masks_e.shape[-2:]), masks_g.reshape(-1, *masks_g.shape[-2:])
    assert any(m.mean() > 0.01 for m in flat_e)
    for a, b in zip(flat_e, flat_g):
        assert iou(a, b) >= 0.98


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", ["box", "points", "mask_input"])
def test_onnxruntime_decoder_matches_eager(ort_vit_t, prompt: str, multimask: bool) -> None:
    predictor = ort_vit_t.predictor
    kwargs: dict = {"box": np.array(BOXES[1], dtype=np.float32)}
    if prompt != "box":
        kwargs = {"point_coords": np.array([[200.0, 100.0], [60.0, 70.0]], dtype=np.float32),
                  "point_labels": np.array([1, 0])}
    if prompt == "mask_input":
        kwargs["mask_input"] = predictor.predict(box=np.array(BOXES[0]), multimask_output=False)[2]
    _assert_decoded_alike(*_both_decoders(lambda: predictor.predict(**kwargs, multimask_output=multimask),
                                          predictor.model))


@pytest.mark.parametrize("multimask", [False, True])
def test_onnxruntime_decoder_takes_batches(ort_vit_t, multimask: bool) -> None:
    """Several prompts per call (GPU-style batches, automask's point batches): a free axis."""
    predictor = ort_vit_t.predictor
    boxes = torch.as_tensor(predictor.transform.apply_boxes(np.array(BOXES[:3], dtype=np.float32),
                                                            predictor.original_size))

    def call():
        masks, scores, logits = predictor.predict_torch(None, None, boxes=boxes, multimask_output=multimask)
        return masks.numpy(), scores.numpy(), logits.numpy()

    expected, got = _both_decoders(call, predictor.model)
    assert got[0].shape[:2] == (3, 3 if multimask else 1)
    _assert_decoded_alike(expected, got)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompts", ["box", "points", "boxes"])
def test_onnxruntime_sam2_decoder_matches_eager(ort_sam2_t, prompts: str, multimask: bool) -> None:
    """SAM2's decoder (high-resolution features in, its choice by stability after): random
    weights, so logits and scores are compared, not masks."""
    predictor = ort_sam2_t.predictor
    kwargs = {"box": np.array(BOXES[1], dtype=np.float32)}
    if prompts == "points":
        kwargs = {"point_coords": np.array([[200.0, 100.0], [60.0, 70.0]], dtype=np.float32),
                  "point_labels": np.array([1, 0])}
    if prompts == "boxes":
        kwargs = {"box": np.array(BOXES[:3], dtype=np.float32)}

    def call():
        with torch.inference_mode():
            return predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)

    expected, got = _both_decoders(call, ort_sam2_t.model, "sam_mask_decoder")
    _assert_logits_alike(expected, got)
    assert ort_sam2_t.decoder_path == "onnxruntime"


def _canvas(detection, shape: tuple[int, int]) -> np.ndarray:
    full = np.zeros(shape, bool)
    x0, y0 = int(detection.origin[0]), int(detection.origin[1])
    full[y0:y0 + detection.mask.shape[0], x0:x0 + detection.mask.shape[1]] = detection.mask
    return full


def test_automask_through_the_onnxruntime_decoder(ort_vit_t, conditioned_vit_t: Path, rgb: np.ndarray) -> None:
    """SamAutomaticMaskGenerator decodes batches of points through the same wrapped decoder."""
    params = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
              "box_nms_thresh": 1.0, "include_image_edge": True}
    sidecar = validate_sidecar({"model": "vit_t", "automask": params}, name="a")

    def run(adapter) -> list[np.ndarray]:
        detections = adapter.run(RunContext(sidecar=sidecar, image=rgb, image_key=f"auto{id(adapter)}"))
        return sorted((_canvas(d, rgb.shape[:2]) for d in detections), key=lambda m: (m.sum(), m.argmax()))

    got = run(ort_vit_t)
    assert ort_vit_t.decoder_path == "onnxruntime"
    expected = run(_adapter(conditioned_vit_t, (), None))
    assert len(got) == len(expected) == 16
    for a, b in zip(expected, got):
        assert iou(a, b) >= 0.98


def test_the_decoder_export_is_cached_and_reused(ort_vit_t, conditioned_vit_t: Path, encoder_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_export(self, folder: Path) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime.Export, "write", no_export)
    again = _adapter(conditioned_vit_t, ("onnxruntime",), encoder_cache)  # a second pool: the daemon restarted
    assert (again.encoder_path, again.decoder_path) == ("onnxruntime", "onnxruntime")
    assert sorted(p.name.split("-")[0] for p in encoder_cache.glob("*-vit_t-*")) == ["decoder", "encoder"]


def _decoder_export(cache: Path) -> Path:
    (folder,) = cache.glob("decoder-vit_t-*")
    return folder


def _break_by_raising(cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    def unexportable(*args):
        raise RuntimeError("unsupported operator")

    shutil.rmtree(_decoder_export(cache))  # so that the job's pool exports it again
    monkeypatch.setattr("samwatch.models.accel.decoders._Sam1PredictMasks.forward", unexportable)
    return "unsupported operator"


def _break_by_corrupting(cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (_decoder_export(cache) / onnx_runtime.MODEL_FILE).write_bytes(b"not an onnx model")
    return "could not be built"


@pytest.mark.parametrize("breaks", [_break_by_raising, _break_by_corrupting])
def test_a_broken_decoder_export_falls_back_to_eager_with_one_warning(
        breaks, ort_vit_t, tmp_path: Path, conditioned_vit_t: Path, encoder_cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "encoders"
    shutil.copytree(encoder_cache, cache)  # this session's exports; the encoder's stays good
    reason = breaks(cache, monkeypatch)
    result, warnings = _job(tmp_path, conditioned_vit_t, cache)
    assert (result["samwatch"]["image_encoder"], result["samwatch"]["mask_decoder"]) == ("onnxruntime", "eager")
    assert len(result["features"]) == len(BOXES)
    assert len(warnings) == 1 and "mask decoder onnxruntime" in warnings[0] and reason in warnings[0]


def test_a_decoder_failing_on_a_call_falls_back_for_good(ort_vit_t, conditioned_vit_t: Path, encoder_cache: Path,
                                                        rgb: np.ndarray) -> None:
    fast = _adapter(conditioned_vit_t, ("onnxruntime",), encoder_cache)
    decoder = fast.predictor.model.mask_decoder

    def broken(*inputs: torch.Tensor) -> None:
        raise RuntimeError("session lost")

    decoder._fast = broken
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    try:
        masks = _masks(fast, rgb)
    finally:
        logger.remove(sink)
    assert len(masks) == len(BOXES) and all(m.mean() > 0.01 for m in masks)
    assert fast.decoder_path == "eager" and "session lost" in decoder.failure
    assert len(warnings) == 1
    assert not any(".eager." in key for key in fast.predictor.model.state_dict())  # still transparent


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("steps", [("sdpa", "bf16"), ("sdpa", "fp16"), ("sdpa", "bf16", "compile")])
def test_gpu_paths_match_eager(steps: tuple[str, ...], conditioned_vit_t: Path, rgb: np.ndarray) -> None:
    spec = LoadSpec("vit_t", conditioned_vit_t, "default", sha256=_sha256(conditioned_vit_t))
    eager_gpu = ModelPool(torch.device("cuda"), ModelSettings(accelerate={"cuda": []})).get(spec)
    fast = ModelPool(torch.device("cuda"), ModelSettings(accelerate={"cuda": steps})).get(spec)
    expected, got = _masks(eager_gpu, rgb), _masks(fast, rgb)
    assert fast.encoder_path == "+".join(steps)
    for a, b in zip(expected, got):
        assert iou(a, b) >= 0.98
