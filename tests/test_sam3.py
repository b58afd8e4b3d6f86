"""The SAM3 adapter's own logic, with sam3's processor, models and video predictor faked at
their seams, and the CUDA-redirecting torch mode on real tensors. Seconds, no weights."""

from __future__ import annotations

import gzip
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from samwatch.errors import JobError
from samwatch.models import sam3 as sam3_adapter
from samwatch.models.base import RunContext
from samwatch.vocab import LoadSpec
from samwatch.models.sam3_device import CudaRedirect, empty_safe_connected_components, on_device
from samwatch.sidecar import Sidecar

WIDTH, HEIGHT = 40, 30


# -- fakes ------------------------------------------------------------------------------


class FakeProcessor:
    """Sam3Processor's interface; each instance is a (score, box) and its mask that box."""

    def __init__(self, instances: list[tuple[float, tuple[int, int, int, int]]]) -> None:
        self.instances = instances
        self.threshold = 0.5
        self.calls: list[tuple[Any, ...]] = []
        self.encodes = 0

    def set_image(self, image: Image.Image, state: dict | None = None) -> dict:
        self.encodes += 1
        width, height = image.size
        return {
            "original_height": height,
            "original_width": width,
            "backbone_out": {"vision_features": torch.zeros(1), "backbone_fpn": [torch.zeros(1)]},
        }

    def set_confidence_threshold(self, threshold: float, state: dict | None = None) -> dict | None:
        self.threshold = threshold
        self.calls.append(("threshold", threshold))
        return state

    def set_text_prompt(self, prompt: str, state: dict) -> dict:
        self.calls.append(("text", prompt, "language_features" in state["backbone_out"]))
        state["backbone_out"]["language_features"] = prompt  # as sam3 writes into the state
        return self._ground(state)

    def add_geometric_prompt(self, box: list[float], label: bool, state: dict) -> dict:
        self.calls.append(("box", box, label))
        state.setdefault("geometric_prompt", []).append((box, label))
        return self._ground(state)

    def _ground(self, state: dict) -> dict:
        height, width = state["original_height"], state["original_width"]
        kept = [(score, box) for score, box in self.instances if score > self.threshold]
        masks = torch.zeros(len(kept), 1, height, width, dtype=torch.bool)
        for index, (_, (x1, y1, x2, y2)) in enumerate(kept):
            masks[index, 0, y1:y2, x1:x2] = True
        state["masks"] = masks
        state["scores"] = torch.tensor([score for score, _ in kept])
        return state


class FakeVideoModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detector = torch.nn.Linear(2, 2)
        self.tracker = torch.nn.Linear(2, 2)


class FakePredictor:
    """sam3's video request API; yields one object per propagated frame."""

    def __init__(self, fail_on: str | None = None, error: str = "Torch not compiled with CUDA enabled") -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_on = fail_on
        self.error = error
        self.frames: list[Image.Image] = []

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        if request["type"] == self.fail_on:
            raise RuntimeError(self.error)
        if request["type"] == "start_session":
            self.frames = request["resource_path"]
            return {"session_id": "s1"}
        return {"frame_index": request.get("frame_index"), "outputs": {}}

    def handle_stream_request(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self.requests.append(request)
        start = request["start_frame_index"] or 0
        for frame_index in range(start, len(self.frames)):
            mask = np.zeros((2, HEIGHT, WIDTH), dtype=bool)
            mask[0, frame_index : frame_index + 5, 0:5] = True  # object 7 only; object 9 is empty
            yield {
                "frame_index": frame_index,
                "outputs": {
                    "out_obj_ids": np.array([7, 9]),
                    "out_probs": np.array([0.9, 0.8], dtype=np.float32),
                    "out_binary_masks": mask,
                },
            }

    @property
    def types(self) -> list[str]:
        return [request["type"] for request in self.requests]


class FakeMedia:
    def __init__(self, n_frames: int) -> None:
        self.n_frames, self.width, self.height = n_frames, WIDTH, HEIGHT

    def frames(self) -> Iterator[np.ndarray]:
        for index in range(self.n_frames):
            yield np.full((HEIGHT, WIDTH, 3), index, dtype=np.uint8)


# -- fixtures ---------------------------------------------------------------------------


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> LoadSpec:
    torch.save({"model": state}, path)
    return LoadSpec(model_type="sam3", checkpoint=path, weights_name="default", source=str(path))


@pytest.fixture()
def official_layout(tmp_path: Path) -> LoadSpec:
    """A checkpoint shaped like sam3.pt: detector.*, tracker.*, and the tracker's neck."""
    torch.manual_seed(0)
    return write_checkpoint(
        tmp_path / "sam3.pt",
        {
            "detector.weight": torch.randn(2, 2),
            "detector.bias": torch.randn(2),
            "tracker.weight": torch.randn(2, 2),
            "tracker.bias": torch.randn(2),
        },
    )


@pytest.fixture()
def processor(monkeypatch: pytest.MonkeyPatch) -> FakeProcessor:
    fake = FakeProcessor([(0.9, (2, 3, 12, 13)), (0.7, (20, 5, 30, 25)), (0.2, (0, 0, 4, 4))])
    monkeypatch.setattr(sam3_adapter, "build_image_model", lambda: torch.nn.Linear(2, 2))
    monkeypatch.setattr(sam3_adapter, "make_processor", lambda model, device: fake)
    return fake


@pytest.fixture()
def adapter(processor: FakeProcessor, official_layout: LoadSpec) -> sam3_adapter.Adapter:
    adapter = sam3_adapter.Adapter()
    adapter.setup(official_layout, torch.device("cpu"), embedding_cache=2)
    return adapter


def image_context(sidecar: dict[str, Any], key: str = "img-1") -> RunContext:
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    return RunContext(sidecar=Sidecar.model_validate(sidecar), image=image, image_key=key)


def video_context(video: dict[str, Any], n_frames: int = 4, **sidecar: Any) -> tuple[RunContext, list]:
    progress: list[tuple[str, float]] = []
    ctx = RunContext(
        sidecar=Sidecar.model_validate({"model": "sam3", "video": video, **sidecar}),
        image=None,
        image_key="video-1",
        frames=FakeMedia(n_frames),
        progress=lambda stage, fraction: progress.append((stage, fraction)),
    )
    return ctx, progress


# -- checkpoints ------------------------------------------------------------------------


def test_setup_loads_the_detector_part_of_the_official_layout(adapter: sam3_adapter.Adapter) -> None:
    state = torch.load(adapter.spec.checkpoint, weights_only=True)["model"]
    assert torch.equal(adapter.model.weight, state["detector.weight"])
    assert adapter.parameter_bytes() == 6 * 4


def test_setup_refuses_weights_of_another_architecture(processor: FakeProcessor, tmp_path: Path) -> None:
    spec = write_checkpoint(tmp_path / "sam2.pt", {"image_encoder.weight": torch.zeros(2, 2)})
    with pytest.raises(JobError) as caught:
        sam3_adapter.Adapter().setup(spec, torch.device("cpu"))
    assert caught.value.code == "weights_wrong_architecture"
    assert "sam3" in caught.value.message


def test_image_model_state_keeps_foreign_keys_for_the_strict_check() -> None:
    state = {
        "detector.a": 1,
        "tracker.b": 2,
        "detector.backbone.vision_backbone.sam2_convs.0.w": 3,
        "image_encoder.c": 4,
    }
    assert sam3_adapter.image_model_state(state) == {"a": 1, "image_encoder.c": 4}


def test_missing_sam3_package_is_model_not_installed(
    monkeypatch: pytest.MonkeyPatch, official_layout: LoadSpec
) -> None:
    for name in [name for name in sys.modules if name == "sam3" or name.startswith("sam3.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "sam3", None)
    with pytest.raises(JobError) as caught:
        sam3_adapter.Adapter().setup(official_layout, torch.device("cpu"))
    assert caught.value.code == "model_not_installed"
    assert "sam3" in caught.value.message


def test_bpe_vocabulary_ships_with_samwatch_and_reads() -> None:
    assert sam3_adapter.BPE_PATH.is_file()
    merges = gzip.open(sam3_adapter.BPE_PATH).read().decode("utf-8").split("\n")
    assert merges[0].endswith("#version: 0.2") and len(merges) > 260_000
    assert merges[1].split() == ["i", "n"]


# -- image jobs -------------------------------------------------------------------------


def samapi_norm_box(box_xywh: list[int], width: int, height: int) -> list[float]:
    """samapi's _to_norm_box_cxcywh: box_xywh_to_cxcywh, then normalize_bbox."""
    x, y, w, h = torch.tensor(box_xywh, dtype=torch.float32).view(-1, 4).unbind(-1)
    cxcywh = torch.stack([x + 0.5 * w, y + 0.5 * h, w, h], dim=-1)
    cxcywh[..., 0] /= width
    cxcywh[..., 1] /= height
    cxcywh[..., 2] /= width
    cxcywh[..., 3] /= height
    return cxcywh.flatten().tolist()


@pytest.mark.parametrize("box_xywh", [[2, 3, 10, 10], [0, 0, WIDTH, HEIGHT], [13, 7, 5, 21]])
def test_boxes_become_samapis_normalised_cxcywh(box_xywh: list[int]) -> None:
    x, y, w, h = box_xywh
    converted = sam3_adapter.normalized_cxcywh((x, y, x + w, y + h), WIDTH, HEIGHT)
    assert converted == pytest.approx(samapi_norm_box(box_xywh, WIDTH, HEIGHT), abs=1e-6)


def test_text_and_boxes_in_samapi_form(adapter: sam3_adapter.Adapter, processor: FakeProcessor) -> None:
    ctx = image_context(
        {
            "type": "sam3",
            "text_prompt": "cell",
            "positive_bboxes": [[2, 3, 10, 10]],
            "negative_bboxes": [[20, 5, 10, 20]],
            "confidence_threshold": 0.4,
        }
    )
    detections = adapter.run(ctx)
    assert processor.calls == [
        ("threshold", 0.4),
        ("text", "cell", False),
        ("box", pytest.approx(samapi_norm_box([2, 3, 10, 10], WIDTH, HEIGHT)), True),
        ("box", pytest.approx(samapi_norm_box([20, 5, 10, 20], WIDTH, HEIGHT)), False),
    ]
    assert [d.score for d in detections] == pytest.approx([0.9, 0.7])
    assert all(d.mask.shape == (HEIGHT, WIDTH) and d.mask.dtype == bool for d in detections)
    assert detections[0].mask[3:13, 2:12].all() and detections[0].mask.sum() == 100
    assert {d.label for d in detections} == {"cell"}


def test_native_xyxy_boxes_without_text(adapter: sam3_adapter.Adapter, processor: FakeProcessor) -> None:
    ctx = image_context({"positive_bboxes": [[2, 3, 12, 13]], "label": "nucleus", "confidence_threshold": 0.8})
    detections = adapter.run(ctx)
    assert processor.calls == [
        ("threshold", 0.8),
        ("box", pytest.approx(samapi_norm_box([2, 3, 10, 10], WIDTH, HEIGHT)), True),
    ]
    assert [(d.score, d.label) for d in detections] == [(pytest.approx(0.9), "nucleus")]


def test_box_off_the_image_is_refused(adapter: sam3_adapter.Adapter) -> None:
    with pytest.raises(JobError) as caught:
        adapter.run(image_context({"text": "cell", "negative_bboxes": [[0, 0, WIDTH + 1, 5]]}))
    assert (caught.value.code, caught.value.field) == ("prompt_out_of_bounds", "negative_bboxes.0")


def test_embedding_reused_and_prompts_do_not_leak(
    adapter: sam3_adapter.Adapter, processor: FakeProcessor
) -> None:
    adapter.run(image_context({"text": "cell", "positive_bboxes": [[2, 3, 12, 13]]}))
    processor.calls.clear()
    adapter.run(image_context({"text": "nucleus"}))
    assert processor.encodes == 1
    assert processor.calls == [("threshold", 0.5), ("text", "nucleus", False)]
    adapter.run(image_context({"text": "cell"}, key="img-2"))
    assert processor.encodes == 2


def test_point_prompts_are_for_other_types(adapter: sam3_adapter.Adapter) -> None:
    with pytest.raises(JobError) as caught:
        adapter.run(image_context({"prompts": [{"points": [[1, 1]]}]}))
    assert caught.value.code == "sidecar_invalid" and "prompts" in caught.value.message


def test_stages_report_progress(adapter: sam3_adapter.Adapter) -> None:
    progress: list[tuple[str, float]] = []
    ctx = image_context({"text": "cell", "positive_bboxes": [[2, 3, 12, 13]]})
    ctx.progress = lambda stage, fraction: progress.append((stage, fraction))
    adapter.run(ctx)
    assert progress == [("encoding image", 0.0), ("decoding prompts", 0.5), ("decoding prompts", 1.0)]


# -- video jobs -------------------------------------------------------------------------


@pytest.fixture()
def predictor(monkeypatch: pytest.MonkeyPatch) -> FakePredictor:
    fake = FakePredictor()
    # the adapter fixes this sam3 module during video calls; a stub spares importing sam3
    stub = types.ModuleType("sam3.perflib.connected_components")
    stub.connected_components_cpu = lambda masks: (masks, masks)
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    monkeypatch.setattr(sam3_adapter, "build_video_model", FakeVideoModel)
    monkeypatch.setattr(sam3_adapter, "make_video_predictor", lambda model: fake)
    return fake


def test_video_request_sequence(adapter: sam3_adapter.Adapter, predictor: FakePredictor) -> None:
    ctx, progress = video_context(
        {
            "start_frame_idx": 1,
            "max_frame_num_to_track": 5,
            "objects": {1: [{"obj_id": 3, "text": "cell", "boxes_xywh": [[4, 6, 8, 3]], "box_labels": [0]}]},
        }
    )
    detections = adapter.run(ctx)
    assert predictor.types == ["start_session", "add_prompt", "propagate_in_video", "close_session"]
    assert len(predictor.frames) == 4 and predictor.frames[2].size == (WIDTH, HEIGHT)
    add = predictor.requests[1]
    assert add["frame_index"] == 1 and add["text"] == "cell" and add["obj_id"] == 3
    assert add["bounding_boxes"] == [pytest.approx([4 / WIDTH, 6 / HEIGHT, 8 / WIDTH, 3 / HEIGHT])]
    assert add["bounding_box_labels"] == [0] and add["session_id"] == "s1"
    propagate = predictor.requests[2]
    assert propagate["propagation_direction"] == "forward"
    assert (propagate["start_frame_index"], propagate["max_frame_num_to_track"]) == (1, 5)
    assert [(d.frame, d.obj_id, d.score, d.label) for d in detections] == [
        (frame, 7, pytest.approx(0.9), "cell") for frame in (1, 2, 3)
    ]
    assert detections[0].mask.shape == (HEIGHT, WIDTH)
    tracking = [fraction for stage, fraction in progress if stage == "tracking"]
    assert tracking == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_video_bbox_reverse_and_per_object_prompts(adapter: sam3_adapter.Adapter, predictor: FakePredictor) -> None:
    ctx, _ = video_context(
        {
            "reverse": True,
            "objects": {
                0: [{"obj_id": 1, "text": "cell"}],
                2: [{"obj_id": 2, "bbox": [4, 6, 12, 9]}],
            },
        },
        label="blob",
    )
    detections = adapter.run(ctx)
    adds = [r for r in predictor.requests if r["type"] == "add_prompt"]
    assert [(r["frame_index"], r["obj_id"], r["text"]) for r in adds] == [(0, 1, "cell"), (2, 2, None)]
    assert adds[0]["bounding_boxes"] is None
    assert adds[1]["bounding_boxes"] == [pytest.approx([4 / WIDTH, 6 / HEIGHT, 8 / WIDTH, 3 / HEIGHT])]
    assert adds[1]["bounding_box_labels"] == [1]
    assert predictor.requests[-2]["propagation_direction"] == "both"
    assert {d.label for d in detections} == {"blob"}


def test_video_model_shares_the_image_models_tensors(
    adapter: sam3_adapter.Adapter, predictor: FakePredictor
) -> None:
    adapter.run(video_context({"objects": {0: [{"obj_id": 1, "text": "cell"}]}})[0])
    assert adapter.video_model.detector.weight.data_ptr() == adapter.model.weight.data_ptr()
    state = torch.load(adapter.spec.checkpoint, weights_only=True)["model"]
    assert torch.equal(adapter.video_model.tracker.weight, state["tracker.weight"])
    assert adapter.parameter_bytes() == 12 * 4  # the detector counted once


def test_session_closed_when_a_prompt_fails(adapter: sam3_adapter.Adapter, predictor: FakePredictor) -> None:
    predictor.fail_on, predictor.error = "add_prompt", "boom"
    with pytest.raises(RuntimeError, match="boom"):
        adapter.run(video_context({"objects": {0: [{"obj_id": 1, "text": "cell"}]}})[0])
    assert predictor.types[-1] == "close_session"


def test_cuda_only_path_is_model_requires_cuda(adapter: sam3_adapter.Adapter, predictor: FakePredictor) -> None:
    predictor.fail_on = "add_prompt"
    with pytest.raises(JobError) as caught:
        adapter.run(video_context({"objects": {0: [{"obj_id": 1, "text": "cell"}]}})[0])
    assert caught.value.code == "model_requires_cuda"
    assert "CUDA" in caught.value.message and "device: cuda" in caught.value.message
    assert predictor.types[-1] == "close_session"


def test_cancelled_tracking_still_closes_the_session(
    adapter: sam3_adapter.Adapter, predictor: FakePredictor
) -> None:
    ctx, _ = video_context({"objects": {0: [{"obj_id": 1, "text": "cell"}]}})

    def cancel(stage: str, fraction: float) -> None:
        if stage == "tracking":
            raise JobError("cancelled", "stop")

    ctx.progress = cancel
    with pytest.raises(JobError, match="stop"):
        adapter.run(ctx)
    assert predictor.types[-1] == "close_session"


@pytest.mark.parametrize(
    ("obj", "code", "field"),
    [
        ({"obj_id": 1, "points": [[1, 1]]}, "sidecar_invalid", "video.objects.0.0.points"),
        ({"obj_id": 1, "boxes_xywh": [[0, 0, 5, 5], [5, 5, 5, 5]]}, "sidecar_invalid", "video.objects.0.0.boxes_xywh"),
        ({"obj_id": 1, "boxes_xywh": [[30, 0, 20, 5]]}, "prompt_out_of_bounds", "video.objects.0.0"),
    ],
)
def test_video_prompts_sam3_cannot_take_are_refused_before_work(
    adapter: sam3_adapter.Adapter, predictor: FakePredictor, obj: dict, code: str, field: str
) -> None:
    with pytest.raises(JobError) as caught:
        adapter.run(video_context({"objects": {0: [obj]}})[0])
    assert (caught.value.code, caught.value.field) == (code, field)
    assert predictor.requests == []


def test_prompt_on_a_frame_past_the_end_is_refused(adapter: sam3_adapter.Adapter, predictor: FakePredictor) -> None:
    with pytest.raises(JobError) as caught:
        adapter.run(video_context({"objects": {9: [{"obj_id": 1, "text": "cell"}]}})[0])
    assert caught.value.code == "prompt_out_of_bounds"


@pytest.mark.parametrize(
    ("start", "max_frames", "reverse", "expected"),
    [(0, None, False, 10), (3, 2, False, 3), (3, None, True, 10), (3, 2, True, 5), (9, None, False, 1)],
)
def test_propagation_length_matches_sam3s_processing_order(
    start: int, max_frames: int | None, reverse: bool, expected: int
) -> None:
    assert sam3_adapter.propagation_length(start, max_frames, 10, reverse) == expected


# -- the device mode --------------------------------------------------------------------

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what fails without CUDA")


def test_factories_asking_for_cuda_land_on_the_chosen_device() -> None:
    with on_device(torch.device("cpu")):
        made = [
            torch.zeros(2, device="cuda"),
            torch.ones(2, device="cuda:0"),
            torch.tensor([1.0], device=torch.device("cuda")),
            torch.arange(3, device=torch.device("cuda", 0)),
            torch.empty(3, pin_memory=True),
        ]
    assert all(t.device.type == "cpu" for t in made)
    assert not made[-1].is_pinned()


def test_moves_to_cuda_stay_put_and_pinning_is_identity() -> None:
    x = torch.arange(4.0)
    module = torch.nn.Linear(2, 2)
    with on_device(torch.device("cpu")):
        assert x.cuda() is x
        assert x.cuda(non_blocking=True).device.type == "cpu"
        assert x.to("cuda").device.type == "cpu"
        assert x.to(device="cuda:0", non_blocking=True).device.type == "cpu"
        moved = x.to("cuda", torch.float64)
        assert (moved.device.type, moved.dtype) == ("cpu", torch.float64)
        assert x.pin_memory() is x
        module.cuda()
        module.to("cuda")
        module.to(device=torch.device("cuda"))
        assert x.to(torch.bfloat16).dtype == torch.float32
        assert x.to(dtype=torch.bfloat16).dtype == torch.float32
    assert module.weight.device.type == "cpu"


@needs_no_cuda
def test_nothing_leaks_after_exit_or_to_other_threads() -> None:
    seen: list[int] = []
    with on_device(torch.device("cpu")):
        thread = threading.Thread(target=lambda: seen.append(len(torch.overrides._get_current_function_mode_stack())))
        thread.start()
        thread.join()
    assert seen == [0]
    assert torch.overrides._get_current_function_mode_stack() == []
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    assert torch.arange(2.0).to(torch.bfloat16).dtype == torch.bfloat16


def test_cuda_devices_are_not_redirected() -> None:
    assert isinstance(on_device(torch.device("cuda")), nullcontext)
    assert isinstance(on_device(torch.device("cuda:1")), torch.cuda.device)


def test_redirect_mode_maps_to_any_chosen_device() -> None:
    with CudaRedirect(torch.device("meta")):
        assert torch.zeros(2, device="cuda").device.type == "meta"
        assert torch.arange(2.0).cuda().device.type == "meta"


def test_connected_components_fallback_takes_empty_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sam3 0.1.4's CPU fallback stacks an empty list when a frame has no new detections."""
    module = types.ModuleType("sam3.perflib.connected_components")

    def connected_components_cpu(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.stack(list(masks.long()))  # like sam3: fails on an empty batch
        return labels, labels

    module.connected_components_cpu = connected_components_cpu
    module.connected_components = lambda masks: module.connected_components_cpu(masks)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    masks = torch.ones(2, 1, 6, 4, dtype=torch.uint8)
    with empty_safe_connected_components():
        labels, counts = module.connected_components(masks[:0])
        assert labels.shape == counts.shape == (0, 1, 6, 4)
        assert module.connected_components(masks)[0].eq(1).all()
    assert module.connected_components_cpu is connected_components_cpu
