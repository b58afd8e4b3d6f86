"""SAM2 video tracking: samapi's ``/sam/video/`` on frames streamed from a ``Media``.

``track(adapter, ctx)`` does what samapi's ``get_video_segments`` does (prompt objects with
``add_new_points_or_box``, then ``propagate_in_video``), with these differences:

* **Shared weights.** The ``SAM2VideoPredictor`` is built once per loaded model with sam2's own
  ``build_sam2_video_predictor`` (so every video-only setting, ``fill_hole_area=8``,
  ``binarize_mask_from_pts_for_mem_enc`` and the class itself, is exactly sam2's) and then takes
  the image model's parameters with ``load_state_dict(..., assign=True)``: the two models hold the
  very same ``Parameter`` objects, so the weights are in memory once and a later in-place weight
  load reaches both. The one-off cost is sam2's random initialisation of the throwaway weights
  (≈1 s for hiera_t on 2 CPU cores); it is cached on the adapter as ``_video_predictor``.
  Class-swapping the adapter's model would skip that second, but it either mutates the model the
  image path uses or copies private ``nn.Module`` internals that sam2 may change.
* **Streamed frames.** sam2's ``init_state`` decodes the whole video into one float tensor
  (3×1024×1024×4 B = 12 MiB per frame). Here ``inference_state["images"]`` is a
  :class:`LazyFrames`: frame *i* is read from ``ctx.frames.frame(i)``, resized and normalised
  to the same values as sam2's ``load_video_frames`` makes, when sam2 asks for it; only the last
  ``FRAME_CACHE`` frames are kept. Frame 0 is not encoded up front (sam2's warm-up), so a job
  prompted on frame 40 never touches frames 0-39.
* **Bounded tracking state.** sam2 keeps every tracked frame's memory (per object and frame:
  bf16 ``maskmem_features`` 64×(S/16)² = 512 KiB, float ``pred_masks`` (S/4)² = 256 KiB, an
  ``obj_ptr``), ≈0.77 MiB per object per frame at S = 1024, growing with the video. A frame's
  memory is only ever read by the next ``memory_reach`` frames in tracking order
  (``num_maskmem`` mask memories, ``max_obj_ptrs_in_encoder`` object pointers), so older
  non-conditioning outputs are dropped as tracking moves on; prompted (conditioning) frames are
  always kept. The results are unchanged, and the state stays below
  objects × (prompted frames + 2·(reach + 1)) × 0.77 MiB (≈25 MiB per object for SAM2.1) whatever
  the length. Being bounded, it stays on the compute device (``offload_state_to_cpu=False``:
  sam2 measures offloading at 10-15 % fewer frames per second). Frames are never offloaded
  either (``offload_video_to_cpu=False``): only ``FRAME_CACHE`` of them exist, on the device.
* **Objects prompted after the start frame** are tracked from the start frame, where sam2 1.1
  crashes on a dtype mismatch (see :class:`FloatMemoryAttention`).
* **Reverse.** With ``video.reverse`` a second pass runs backwards from the same start frame
  (samapi has no such option). The start frame is in both passes; its forward result is kept,
  since only the forward pass matches what samapi returns.

What still grows with the frame count: the returned masks (objects × tracked frames × H×W bytes;
the job's ``limits.max_video_bytes`` bounds the frames it may hold) and sam2's per-frame
bookkeeping (a tiny dict per object and frame).

``max_frame_num_to_track`` keeps sam2's meaning, as samapi passes it through: a pass covers the
start frame plus up to that many frames after (or, reversed, before) it.

Scores are ``sigmoid(object_score_logits)``: every SAM2/SAM2.1 config predicts an object score
per frame (``pred_obj_scores``), the model's own "the object is in this frame" probability.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import closing
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictor

from samwatch.errors import JobError
from samwatch.models.base import Detection, LruCache, ProgressFn, RunContext, check_inside
from samwatch.sidecars.schema import VideoObject, VideoSpec

FRAME_CACHE = 2  # frames held as tensors: the prompted frame and the one being tracked
_IMG_MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
_IMG_STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]


class Media(Protocol):
    """What tracking needs of ``samwatch.media.read.Media``."""

    n_frames: int
    width: int
    height: int

    def frame(self, index: int) -> np.ndarray: ...


class LazyFrames:
    """sam2's ``inference_state["images"]``, decoded on demand from a ``Media``.

    Item *i* is frame *i* as sam2's ``load_video_frames`` makes it: PIL-resized to S×S, scaled
    to [0, 1] in float64, then float32 normalised with ImageNet mean and std, 3×S×S. The
    arithmetic runs on ``device`` (the uint8 pixels travel, a quarter of the float bytes); each
    step is an exactly rounded IEEE operation, so the values equal sam2's CPU-made ones.
    """

    def __init__(self, media: Media, image_size: int, device: torch.device,
                 cache_size: int = FRAME_CACHE) -> None:
        self._media = media
        self._image_size = image_size
        self._device = device
        self._mean = _IMG_MEAN.to(device)
        self._std = _IMG_STD.to(device)
        self._cache: LruCache[torch.Tensor] = LruCache(cache_size)

    def __len__(self) -> int:
        return self._media.n_frames

    def __getitem__(self, index: int) -> torch.Tensor:
        key = str(index)
        tensor = self._cache.get(key)
        if tensor is None:
            tensor = self._load(index)
            self._cache.put(key, tensor)
        return tensor

    def _load(self, index: int) -> torch.Tensor:
        size = (self._image_size, self._image_size)
        pixels = np.array(Image.fromarray(self._media.frame(index)).convert("RGB").resize(size))
        tensor = torch.from_numpy(pixels).to(self._device).permute(2, 0, 1)
        return ((tensor.double() / 255.0).float() - self._mean) / self._std


def track(adapter: Any, ctx: RunContext) -> list[Detection]:
    """Track every object of ``ctx.sidecar.video`` through ``ctx.frames``."""
    video = ctx.sidecar.video
    media = ctx.frames
    check_video_prompts(video, media)
    predictor = video_predictor(adapter)
    state = new_inference_state(predictor, media)
    try:
        add_prompts(predictor, state, video.objects)
        return propagate(predictor, state, video, ctx.progress)
    finally:
        predictor.reset_state(state)
        state.clear()  # drops the frame cache and sam2's cached backbone features


def video_predictor(adapter: Any) -> SAM2VideoPredictor:
    """The adapter's video predictor, built on first use and sharing ``adapter.model``'s weights."""
    cached = getattr(adapter, "_video_predictor", None)
    if cached is not None and cached[0] is adapter.model:
        return cached[1]
    predictor = build_video_predictor(adapter.config_used, adapter.model)
    adapter._video_predictor = (adapter.model, predictor)
    return predictor


def build_video_predictor(config: str, model: torch.nn.Module) -> SAM2VideoPredictor:
    # The image size follows the loaded model, so a model built at another resolution is mirrored.
    predictor = build_sam2_video_predictor(
        config, None, device="cpu", hydra_overrides_extra=[f"++model.image_size={model.image_size}"]
    )
    predictor.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    predictor.memory_attention = FloatMemoryAttention(predictor.memory_attention)
    # Moves what is not in the state dict (e.g. RoPE tables) to where the shared weights are.
    return predictor.to(model.device)


class FloatMemoryAttention(torch.nn.Module):
    """sam2's memory attention, given mask memories in the dtype of their positional encoding.

    sam2 stores mask memories as bfloat16 and counts on the float object pointers concatenated
    after them to promote the dtype. On the first frame an object is tracked before the frame it
    was prompted on there is no pointer yet, and without autocast sam2 1.1 (so samapi too) fails
    with "mat1 and mat2 must have the same dtype". The cast is the promotion every other frame
    gets, so results elsewhere are unchanged. It wraps the shared module rather than hooking it,
    so the image model stays exactly as the adapter built it.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *, memory: torch.Tensor, memory_pos: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.inner(memory=memory.to(memory_pos.dtype), memory_pos=memory_pos, **kwargs)


def new_inference_state(predictor: SAM2VideoPredictor, media: Media) -> dict[str, Any]:
    """sam2's ``init_state`` dict, but with lazily loaded frames and no frame-0 warm-up."""
    device = predictor.device
    return {
        "images": LazyFrames(media, predictor.image_size, device),
        "num_frames": media.n_frames,
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": media.height,
        "video_width": media.width,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def check_video_prompts(video: VideoSpec, media: Media) -> None:
    """Refuse what sam2 would fail on or silently misuse, naming the sidecar field."""
    if not any(video.objects.values()):
        raise JobError(
            "sidecar_invalid",
            "A video job needs at least one object: video.objects maps a frame index to "
            "[{obj_id, bbox or points}, ...].",
            field="video.objects",
        )
    n_frames = media.n_frames
    if video.start_frame_idx is not None and video.start_frame_idx >= n_frames:
        raise JobError(
            "prompt_out_of_bounds",
            f"video.start_frame_idx {video.start_frame_idx} is past the last frame ({n_frames - 1}).",
            field="video.start_frame_idx",
        )
    for frame_idx, objects in video.objects.items():
        if not 0 <= frame_idx < n_frames:
            raise JobError(
                "prompt_out_of_bounds",
                f"video.objects has prompts on frame {frame_idx}, but the sequence has frames "
                f"0-{n_frames - 1}.",
                field=f"video.objects.{frame_idx}",
            )
        for index, obj in enumerate(objects):
            _check_object(obj, f"video.objects.{frame_idx}.{index}", media.width, media.height)


def _check_object(obj: VideoObject, where: str, width: int, height: int) -> None:
    if obj.text is not None or obj.boxes_xywh:
        raise JobError(
            "sidecar_invalid",
            f"{where} has a text or boxes_xywh prompt; those are SAM3 concept prompts. "
            "Use model sam3 for them, or prompt SAM2 with bbox and points.",
            field=where,
        )
    check_inside(obj.bbox, obj.points, width, height, where=where, surface="frame")


def add_prompts(
    predictor: SAM2VideoPredictor, state: dict[str, Any], objects: dict[int, list[VideoObject]]
) -> None:
    """samapi's prompting loop: pixel coordinates, normalised by sam2 against the frame size."""
    for frame_idx, frame_objects in objects.items():
        for obj in frame_objects:
            predictor.add_new_points_or_box(
                inference_state=state,
                frame_idx=frame_idx,
                obj_id=obj.obj_id,
                points=np.array(obj.points, dtype=np.float32) if obj.points else None,
                labels=np.array(obj.labels, dtype=np.int32) if obj.points else None,
                box=np.array(obj.bbox, dtype=np.float32) if obj.bbox is not None else None,
            )


@torch.inference_mode()
def propagate(
    predictor: SAM2VideoPredictor, state: dict[str, Any], video: VideoSpec, progress: ProgressFn
) -> list[Detection]:
    """Forward (and optionally reverse) passes; one Detection per object per frame with a mask."""
    n_frames = state["num_frames"]
    prompted = min(frame_idx for frame_idx, objects in video.objects.items() if objects)
    start = video.start_frame_idx if video.start_frame_idx is not None else prompted  # sam2's default
    limit = video.max_frame_num_to_track or n_frames
    passes = [False, True] if video.reverse else [False]
    total = sum(pass_length(start, limit, n_frames, reverse) for reverse in passes)
    reach = memory_reach(predictor)
    # the reverse pass starts by reading the forward pass's memory just after the start frame
    needed_by_reverse = set(range(start, start + reach + 1)) if video.reverse else set()
    by_frame: dict[int, list[Detection]] = {}
    done = 0
    for reverse in passes:
        frames = predictor.propagate_in_video(
            state, start_frame_idx=start, max_frame_num_to_track=limit, reverse=reverse
        )
        with closing(frames):
            for frame_idx, obj_ids, logits in frames:
                if frame_idx not in by_frame:  # the start frame keeps its forward result
                    by_frame[frame_idx] = _detections(state, frame_idx, obj_ids, logits)
                if reverse:
                    _forget_frame(state, frame_idx + reach, set())
                else:
                    _forget_frame(state, frame_idx - reach, needed_by_reverse)
                done += 1
                progress("tracking", done / total)
    return [detection for frame_idx in sorted(by_frame) for detection in by_frame[frame_idx]]


def pass_length(start: int, limit: int, n_frames: int, reverse: bool) -> int:
    """Frames one ``propagate_in_video`` pass yields (sam2's processing order, counted)."""
    if reverse:
        return start - max(start - limit, 0) + 1 if start > 0 else 0
    return min(start + limit, n_frames - 1) - start + 1


def memory_reach(predictor: SAM2VideoPredictor) -> int:
    """How many frames back, in tracking order, sam2 reads a non-conditioning frame's output."""
    mask_memories = (predictor.num_maskmem - 1) * predictor.memory_temporal_stride_for_eval
    return max(mask_memories, predictor.max_obj_ptrs_in_encoder - 1)


def _forget_frame(state: dict[str, Any], frame_idx: int, keep: set[int]) -> None:
    """Drop one frame's tracking memory that no later frame of this job will read."""
    if frame_idx in keep:
        return
    for obj_output in state["output_dict_per_obj"].values():
        obj_output["non_cond_frame_outputs"].pop(frame_idx, None)


def _detections(
    state: dict[str, Any], frame_idx: int, obj_ids: list[int], logits: torch.Tensor
) -> list[Detection]:
    masks = (logits[:, 0] > 0).cpu().numpy()
    detections = []
    for obj_idx, obj_id in enumerate(obj_ids):
        if masks[obj_idx].any():
            score = torch.sigmoid(_frame_output(state, obj_idx, frame_idx)["object_score_logits"])
            detections.append(
                Detection(mask=masks[obj_idx], score=float(score), frame=frame_idx, obj_id=obj_id)
            )
    return detections


def _frame_output(state: dict[str, Any], obj_idx: int, frame_idx: int) -> dict[str, Any]:
    outputs = state["output_dict_per_obj"][obj_idx]
    cond = outputs["cond_frame_outputs"].get(frame_idx)
    return cond if cond is not None else outputs["non_cond_frame_outputs"][frame_idx]
