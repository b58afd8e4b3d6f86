"""SAM3 video jobs, after samapi's ``/sam/sam3video/``: a sam3 video session on the frames,
``add_prompt`` per frame and object, ``propagate_in_video``, one Detection per object per frame.

Frames go to sam3 as PIL images (no JPEG folder, nothing lost to compression); sam3 holds each
as a 1008² float16 tensor (6 MB a frame) on the device. The video model is built on the first
video job; its detector then shares the image model's tensors (3.4 GB of float32), so it
keeps only the tracker and the tracker's neck (about 80 MB) of its own. Building it still
allocates a random-weight copy first: the first video job peaks at about twice the model
(7.5 GB RSS on a CPU) before that copy is released.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, closing, suppress
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from loguru import logger
from PIL import Image

from samwatch.errors import JobError
from samwatch.models.base import Detection, RunContext, load_state_dict_strict
from samwatch.models.sam3 import BPE_PATH, DETECTOR, cuda_failures, import_sam3
from samwatch.models.sam3_device import empty_safe_connected_components, on_device
from samwatch.models.weights_io import load_checkpoint
from samwatch.sidecars.schema import Box, VideoObject, VideoSpec

if TYPE_CHECKING:
    from samwatch.models.sam3 import Adapter


def run_video(adapter: Adapter, ctx: RunContext) -> list[Detection]:
    """A sam3 video session on the job's frames: its prompts added, then tracked through them."""
    video = ctx.sidecar.video
    assert video is not None
    frames = ctx.frames
    requests = video_prompt_requests(video, frames.width, frames.height, frames.n_frames)
    if len(requests) > 1:
        logger.warning(
            "SAM3 video: {} text/box prompts given, but sam3 starts over at each one "
            "(as in samapi); only the last (frame {}, obj_id {}) is tracked",
            len(requests), requests[-1]["frame_index"], requests[-1]["obj_id"],
        )
    predictor = _video_predictor(adapter, ctx)
    with on_device(adapter.device), cuda_failures(adapter.device), _video_context(adapter.device):
        ctx.progress("loading frames", 0.0)
        session_id = predictor.handle_request(
            {"type": "start_session", "resource_path": _pil_frames(frames)}
        )["session_id"]
        try:
            for index, request in enumerate(requests, start=1):
                predictor.handle_request({**request, "type": "add_prompt", "session_id": session_id})
                ctx.progress("prompting", index / len(requests))
            outputs = _propagate(predictor, session_id, video, requests[-1], frames.n_frames, ctx)
        finally:
            predictor.handle_request({"type": "close_session", "session_id": session_id})
    label = ctx.sidecar.label or requests[-1]["text"]
    return list(_video_detections(outputs, label, ctx.sidecar.color))


def _propagate(
    predictor: Any,
    session_id: str,
    video: VideoSpec,
    last_request: dict[str, Any],
    n_frames: int,
    ctx: RunContext,
) -> dict[int, dict[str, Any]]:
    start = video.start_frame_idx if video.start_frame_idx is not None else last_request["frame_index"]
    total = propagation_length(start, video.max_frame_num_to_track, n_frames, video.reverse)
    request = {
        "type": "propagate_in_video",
        "session_id": session_id,
        "propagation_direction": "both" if video.reverse else "forward",
        "start_frame_index": video.start_frame_idx,
        "max_frame_num_to_track": video.max_frame_num_to_track,
    }
    outputs: dict[int, dict[str, Any]] = {}
    # closing(): a cancelled job must end sam3's generator here, inside the device context
    with closing(predictor.handle_stream_request(request)) as stream:
        for response in stream:
            outputs[response["frame_index"]] = response["outputs"]
            ctx.progress("tracking", min(1.0, len(outputs) / total))
    return outputs


def _video_predictor(adapter: Adapter, ctx: RunContext) -> Any:
    """The adapter's video predictor, built on its first video job."""
    if adapter.video_predictor is None:
        assert adapter.model is not None and adapter.spec is not None
        ctx.progress("loading video model", 0.0)
        with on_device(adapter.device), cuda_failures(adapter.device):
            model = build_video_model()
        state = video_model_state(load_checkpoint(adapter.spec), adapter.model)
        load_state_dict_strict(_AssigningModule(model), state, adapter.spec)  # type: ignore[arg-type]
        del state
        _release_freed_memory()
        adapter.video_model = model.to(adapter.device).eval()
        adapter.video_predictor = make_video_predictor(adapter.video_model)
    return adapter.video_predictor


def _video_context(device: torch.device) -> AbstractContextManager[Any]:
    """On CUDA the bf16 autocast sam3's video code assumes; elsewhere float32 (see
    sam3_device) and sam3's CPU connected components fixed for frames without detections."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return empty_safe_connected_components()


def build_video_model() -> torch.nn.Module:
    """sam3's video model (detector + tracker) with random weights on the CPU."""
    model = import_sam3("sam3.model_builder").build_sam3_video_model(
        bpe_path=str(BPE_PATH),
        checkpoint_path=None,
        load_from_HF=False,
        apply_temporal_disambiguation=False,  # as samapi builds it
        device="cpu",
        compile=False,
    )
    # sam3's tracker enters a bf16 CUDA autocast in its constructor and never leaves it, which
    # would switch every later CUDA op of this thread (other adapters too) to bf16; leave it
    # now and enter it around sam3's video calls only (see _video_context).
    model.tracker.bf16_context.__exit__(None, None, None)
    # samwatch runs one process per device; sam3 would read a multi-GPU rank from RANK/WORLD_SIZE.
    model.rank = model.detector.rank = 0
    model.world_size = model.detector.world_size = 1
    return model.eval()


def make_video_predictor(model: torch.nn.Module) -> Any:
    """sam3's request API (start_session, add_prompt, ...) around ``model``.

    Its multi-GPU subclass (what ``build_sam3_video_predictor`` returns) insists on a CUDA
    device and reloads the checkpoint with torch.load; the single-process base class serves
    the same requests once its constructor and CUDA-only log helpers are replaced.
    """
    base = import_sam3("sam3.model.sam3_video_predictor").Sam3VideoPredictor

    class Predictor(base):  # type: ignore[misc, valid-type]
        def __init__(self, video_model: torch.nn.Module) -> None:
            self.model = video_model
            self.async_loading_frames = False
            self.video_loader_type = "cv2"

        def _get_session_stats(self) -> str:
            return f"{len(self._ALL_INFERENCE_STATES)} live sessions"

        def _get_torch_and_gpu_properties(self) -> str:
            return f"torch {torch.__version__}"

    return Predictor(model)


class _AssigningModule:
    """Lets ``load_state_dict_strict`` load by assignment, so tensors are shared, not copied."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        return self.module.load_state_dict(state, strict=strict, assign=True)


def video_model_state(state: dict[str, Any], image_model: torch.nn.Module) -> dict[str, Any]:
    """The video model's tensors: the image model's own for the detector, the rest cloned.

    Cloning the video-only tensors detaches them from the memory-mapped checkpoint file
    (a file rewritten under a mapping would crash the process).
    """
    shared = {DETECTOR + key: value for key, value in image_model.state_dict().items()}
    rest = {key: value.clone() for key, value in state.items() if key not in shared}
    return {**rest, **shared}


def normalized_xywh(box_xywh: Box, width: int, height: int) -> list[float]:
    """Pixel x, y, w, h -> normalised (samapi's normalize_bbox), as sam3's video prompts take."""
    x, y, w, h = box_xywh
    return [x / width, y / height, w / width, h / height]


def video_prompt_requests(
    video: VideoSpec, width: int, height: int, n_frames: int
) -> list[dict[str, Any]]:
    """One sam3 ``add_prompt`` request per frame and object, checked before any work."""
    requests = []
    for frame_index, objects in sorted(video.objects.items()):
        for position, obj in enumerate(objects):
            field = f"video.objects.{frame_index}.{position}"
            if frame_index >= n_frames:
                raise JobError(
                    "prompt_out_of_bounds",
                    f"{field} prompts frame {frame_index}, but the sequence has {n_frames} frames.",
                    field=field,
                )
            requests.append(_video_request(frame_index, obj, width, height, field))
    if not requests:
        raise JobError(
            "sidecar_invalid",
            "A SAM3 video job needs at least one object with 'text' and/or a box under video.objects.",
            field="video.objects",
        )
    return requests


def _video_request(frame_index: int, obj: VideoObject, width: int, height: int, field: str) -> dict[str, Any]:
    if obj.points:
        raise JobError(
            "sidecar_invalid",
            f"{field}: SAM3 video prompts are text and/or boxes (as samapi's sam3video); "
            "points are for the SAM2 types.",
            field=f"{field}.points",
        )
    boxes = list(obj.boxes_xywh)
    labels = list(obj.box_labels) if obj.box_labels is not None else [1] * len(boxes)
    if obj.bbox is not None:
        x1, y1, x2, y2 = obj.bbox
        boxes.append((x1, y1, x2 - x1, y2 - y1))
        labels.append(1)
    if len(boxes) > 1:
        raise JobError(
            "sidecar_invalid",
            f"{field}: sam3 takes one exemplar box per video prompt (it refuses more on a frame it "
            f"has not segmented yet); this object has {len(boxes)}. Keep one box, or use text.",
            field=f"{field}.boxes_xywh",
        )
    for x, y, w, h in boxes:
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise JobError(
                "prompt_out_of_bounds",
                f"{field}: the box (x, y, w, h) {[x, y, w, h]} lies outside the {width}×{height} frames.",
                field=field,
            )
    return {
        "frame_index": frame_index,
        "text": obj.text,
        "points": None,
        "point_labels": None,
        "bounding_boxes": [normalized_xywh(box, width, height) for box in boxes] or None,
        "bounding_box_labels": labels or None,
        "obj_id": obj.obj_id,
    }


def propagation_length(start: int, max_frames: int | None, n_frames: int, reverse: bool) -> int:
    """How many frames sam3 will yield (its _get_processing_order), for progress."""
    span = n_frames if max_frames is None else max_frames
    forward = min(start + span, n_frames - 1) - start + 1
    backward = start - max(start - span, 0) if reverse else 0
    return max(1, forward + backward)


def _pil_frames(frames: Any) -> list[Image.Image]:
    """All frames, read in one sequential pass, as PIL images: sam3 resizes them to 1008²
    float16 itself (6 MB a frame), and unlike samapi's JPEG folder nothing is lost."""
    return [Image.fromarray(frame) for frame in frames.frames()]


def _video_detections(
    outputs: dict[int, dict[str, Any]], label: str | None, color: tuple[int, int, int] | None
) -> Iterator[Detection]:
    for frame_index in sorted(outputs):
        out = outputs[frame_index]
        for obj_id, score, mask in zip(out["out_obj_ids"], out["out_probs"], out["out_binary_masks"]):
            if mask.any():
                yield Detection(
                    mask=np.asarray(mask, dtype=bool), score=float(score), frame=int(frame_index),
                    obj_id=int(obj_id), label=label, color=color,
                )


def _release_freed_memory() -> None:
    """Hand the random-weight detector the video model was built with (3.4 GB, now replaced
    by the shared tensors) back to the OS; glibc would keep most of it in the process."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
