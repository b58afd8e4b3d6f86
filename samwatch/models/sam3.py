"""SAM3 (the ``sam3`` package): concept prompts, text and/or exemplar boxes, on images and videos.

Image jobs ("text" mode) follow samapi's ``/sam/sam3/``: ``Sam3Processor.set_image``, then
``set_confidence_threshold``, ``set_text_prompt`` and one ``add_geometric_prompt`` per box
(normalised cx, cy, w, h); every instance above the threshold becomes one Detection. Each call
reruns sam3's grounding head (seconds on a CPU), so k boxes cost k (+1 with text) passes.
The backbone output of ``set_image`` (213 MiB per image, float32 features and position
encodings at 288², 144² and 72²) is kept in an LRU cache keyed by ``image_key``, so a
re-run with a changed sidecar skips the image encoder.

Video jobs follow ``/sam/sam3video/``: a sam3 video session on the frames, ``add_prompt`` per
frame and object, ``propagate_in_video``, one Detection per object per frame. Frames go to
sam3 as PIL images (no JPEG folder, nothing lost to compression); sam3 holds each as a
1008² float16 tensor (6 MB a frame) on the device. The video model is built on the first
video job; its detector then shares the image model's tensors (3.4 GB of float32), so it
keeps only the tracker and the tracker's neck (about 80 MB) of its own. Building it still
allocates a random-weight copy first: the first video job peaks at about twice the model
(7.5 GB RSS on a CPU) before that copy is released.

sam3 is written for CUDA; on other devices every sam3 call runs inside
:func:`samwatch.models.sam3_device.on_device`, which redirects its CUDA-only calls.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from loguru import logger
from PIL import Image

from samwatch.errors import JobError
from samwatch.models.base import Detection, LruCache, RunContext, check_box, load_state_dict_strict
from samwatch.vocab import LoadSpec
from samwatch.models.sam3_device import empty_safe_connected_components, on_device
from samwatch.models.weights_io import load_checkpoint
from samwatch.sidecar import Box, VideoObject, VideoSpec

BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
DETECTOR = "detector."
# Parts of the official checkpoint that only the video model has: its tracker, and the neck
# that feeds the tracker from the shared backbone.
VIDEO_ONLY_PREFIXES = ("tracker.", "detector.backbone.vision_backbone.sam2_convs.")
_CUDA_ONLY_HINTS = ("cuda", "nvidia", "nccl", "triton")


def _import(name: str) -> ModuleType:
    # Importing sam3.model_builder switches TF32 matmuls on for the whole process, which would
    # change SAM1/SAM2 results on the same GPU: keep the process's own settings.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise JobError(
            "model_not_installed",
            f"Model type sam3 needs the Python package 'sam3' ({exc}); install samwatch with its "
            "dependencies (pip install 'sam3>=0.1.4').",
            field="model",
        ) from None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def build_image_model() -> torch.nn.Module:
    """sam3's image model with random weights on the CPU; the checkpoint is loaded next.

    ``load_from_HF=False`` with no checkpoint path keeps sam3 from downloading anything, and
    the shipped BPE vocabulary replaces the one sam3 0.1.x does not ship.
    """
    return _import("sam3.model_builder").build_sam3_image_model(
        bpe_path=str(BPE_PATH),
        device="cpu",
        eval_mode=True,
        checkpoint_path=None,
        load_from_HF=False,
        enable_segmentation=True,
        enable_inst_interactivity=False,
        compile=False,
    )


def make_processor(model: torch.nn.Module, device: torch.device) -> Any:
    return _import("sam3.model.sam3_image_processor").Sam3Processor(model, device=device)


def build_video_model() -> torch.nn.Module:
    """sam3's video model (detector + tracker) with random weights on the CPU."""
    model = _import("sam3.model_builder").build_sam3_video_model(
        bpe_path=str(BPE_PATH),
        checkpoint_path=None,
        load_from_HF=False,
        apply_temporal_disambiguation=False,  # as samapi builds it
        device="cpu",
        compile=False,
    )
    # sam3's tracker enters a bf16 CUDA autocast in its constructor and never leaves it, which
    # would switch every later CUDA op of this thread (other adapters too) to bf16; leave it
    # now and enter it around sam3's video calls only (see Adapter._video_context).
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
    base = _import("sam3.model.sam3_video_predictor").Sam3VideoPredictor

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


class Adapter:
    """SAM3 behind the samwatch adapter protocol."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.processor: Any = None
        self.video_model: torch.nn.Module | None = None
        self.video_predictor: Any = None
        self.device = torch.device("cpu")
        self.spec: LoadSpec | None = None
        self._embeddings: LruCache[dict[str, Any]] = LruCache(4)

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None:
        state = load_checkpoint(spec)
        with on_device(device), _cuda_failures(device):
            model = build_image_model()
        load_state_dict_strict(model, image_model_state(state), spec)
        del state
        self.model = model.to(device).eval()
        self.processor = make_processor(self.model, device)
        self.device = device
        self.spec = spec
        self._embeddings = LruCache(embedding_cache)

    def parameter_bytes(self) -> int:
        modules = [m for m in (self.model, self.video_model) if m is not None]
        unique = {p.data_ptr(): p.numel() * p.element_size() for m in modules for p in m.parameters()}
        return sum(unique.values())

    def run(self, ctx: RunContext) -> list[Detection]:
        mode = ctx.sidecar.mode
        if mode == "text":
            return self.run_text(ctx)
        if mode == "video":
            return self.run_video(ctx)
        raise JobError(
            "sidecar_invalid",
            f"SAM3 segments concepts: give 'text' and/or 'positive_bboxes' (or a 'video' block); "
            f"this sidecar asks for {mode}, which SAM1/SAM2 types serve.",
            field="text",
        )

    # -- images -------------------------------------------------------------------------

    def run_text(self, ctx: RunContext) -> list[Detection]:
        sidecar = ctx.sidecar
        height, width = ctx.image.shape[:2]
        positive = sidecar.boxes_xyxy(positive=True)
        negative = sidecar.boxes_xyxy(positive=False)
        _check_boxes(positive, width, height, "positive_bboxes")
        _check_boxes(negative, width, height, "negative_bboxes")
        steps = int(sidecar.text is not None) + len(positive) + len(negative)
        with on_device(self.device), _cuda_failures(self.device), torch.inference_mode():
            state = self._image_state(ctx)
            state = self.processor.set_confidence_threshold(sidecar.confidence_threshold, state)
            calls = _prompt_calls(sidecar.text, positive, negative, width, height)
            for done, (method, kwargs) in enumerate(calls, start=1):
                state = getattr(self.processor, method)(state=state, **kwargs)
                ctx.progress("decoding prompts", done / steps)
            masks = state["masks"].squeeze(1).cpu().numpy().astype(bool)
            scores = state["scores"].float().cpu().numpy()
        label = sidecar.label or sidecar.text
        return [
            Detection(mask=mask, score=float(score), label=label, color=sidecar.color)
            for mask, score in zip(masks, scores)
        ]

    def _image_state(self, ctx: RunContext) -> dict[str, Any]:
        """A fresh inference state for this image, its backbone output reused when cached.

        Prompts write into the state (text features into ``backbone_out``, boxes into the
        geometric prompt), so every job gets its own copy of the containers; the tensors,
        which sam3 never changes in place, are shared.
        """
        cached = self._embeddings.get(ctx.image_key)
        if cached is None:
            ctx.progress("encoding image", 0.0)
            state = self.processor.set_image(Image.fromarray(ctx.image))
            cached = _copy_containers(state)
            self._embeddings.put(ctx.image_key, cached)
        return _copy_containers(cached)

    # -- videos -------------------------------------------------------------------------

    def run_video(self, ctx: RunContext) -> list[Detection]:
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
        predictor = self._video(ctx)
        with on_device(self.device), _cuda_failures(self.device), self._video_context():
            ctx.progress("loading frames", 0.0)
            session_id = predictor.handle_request(
                {"type": "start_session", "resource_path": _pil_frames(frames)}
            )["session_id"]
            try:
                for index, request in enumerate(requests, start=1):
                    predictor.handle_request({**request, "type": "add_prompt", "session_id": session_id})
                    ctx.progress("prompting", index / len(requests))
                outputs = self._propagate(predictor, session_id, video, requests[-1], frames.n_frames, ctx)
            finally:
                predictor.handle_request({"type": "close_session", "session_id": session_id})
        label = ctx.sidecar.label or requests[-1]["text"]
        return list(_video_detections(outputs, label, ctx.sidecar.color))

    def _propagate(
        self,
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

    def _video(self, ctx: RunContext) -> Any:
        """The video predictor, built on the first video job."""
        if self.video_predictor is None:
            assert self.model is not None and self.spec is not None
            ctx.progress("loading video model", 0.0)
            with on_device(self.device), _cuda_failures(self.device):
                model = build_video_model()
            state = video_model_state(load_checkpoint(self.spec), self.model)
            load_state_dict_strict(_AssigningModule(model), state, self.spec)  # type: ignore[arg-type]
            del state
            _release_freed_memory()
            self.video_model = model.to(self.device).eval()
            self.video_predictor = make_video_predictor(self.video_model)
        return self.video_predictor

    def _video_context(self) -> AbstractContextManager[Any]:
        """On CUDA the bf16 autocast sam3's video code assumes; elsewhere float32 (see
        sam3_device) and sam3's CPU connected components fixed for frames without detections."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return empty_safe_connected_components()


# -- checkpoints ------------------------------------------------------------------------


def image_model_state(state: dict[str, Any]) -> dict[str, Any]:
    """The image model's tensors from an official SAM3 checkpoint (``detector.*``).

    As ``sam3.model_builder._load_checkpoint`` reads it, but strictly: the video-only parts
    are dropped, anything else that is not ``detector.*`` is kept so the strict load reports
    it (a SAM2 checkpoint registered as sam3, say).
    """
    return {
        key.removeprefix(DETECTOR): value
        for key, value in state.items()
        if not key.startswith(VIDEO_ONLY_PREFIXES)
    }


def video_model_state(state: dict[str, Any], image_model: torch.nn.Module) -> dict[str, Any]:
    """The video model's tensors: the image model's own for the detector, the rest cloned.

    Cloning the video-only tensors detaches them from the memory-mapped checkpoint file
    (a file rewritten under a mapping would crash the process).
    """
    shared = {DETECTOR + key: value for key, value in image_model.state_dict().items()}
    rest = {key: value.clone() for key, value in state.items() if key not in shared}
    return {**rest, **shared}


# -- prompts ----------------------------------------------------------------------------


def normalized_cxcywh(box_xyxy: Box, width: int, height: int) -> list[float]:
    """Pixel x1, y1, x2, y2 -> sam3's normalised cx, cy, w, h (samapi's _to_norm_box_cxcywh)."""
    x1, y1, x2, y2 = box_xyxy
    w, h = x2 - x1, y2 - y1
    return [(x1 + 0.5 * w) / width, (y1 + 0.5 * h) / height, w / width, h / height]


def normalized_xywh(box_xywh: Box, width: int, height: int) -> list[float]:
    """Pixel x, y, w, h -> normalised (samapi's normalize_bbox), as sam3's video prompts take."""
    x, y, w, h = box_xywh
    return [x / width, y / height, w / width, h / height]


def _prompt_calls(
    text: str | None, positive: list[Box], negative: list[Box], width: int, height: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """samapi's sequence of processor calls. Without text, sam3's add_geometric_prompt sets
    its own "visual" prompt, so box-only jobs need no text."""
    if text is not None:
        yield "set_text_prompt", {"prompt": text}
    for boxes, label in ((positive, True), (negative, False)):
        for box in boxes:
            yield "add_geometric_prompt", {"box": normalized_cxcywh(box, width, height), "label": label}


def _check_boxes(boxes: list[Box], width: int, height: int, field: str) -> None:
    for index, box in enumerate(boxes):
        check_box(box, width, height, field=f"{field}.{index}")


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


# -- helpers ----------------------------------------------------------------------------


def _copy_containers(value: Any) -> Any:
    """Dicts and lists copied all the way down; tensors and other leaves shared."""
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value


def _release_freed_memory() -> None:
    """Hand the random-weight detector the video model was built with (3.4 GB, now replaced
    by the shared tensors) back to the OS; glibc would keep most of it in the process."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def _cuda_failures(device: torch.device) -> Iterator[None]:
    """Off CUDA, a sam3 path that still needs it fails as model_requires_cuda, not a crash."""
    try:
        yield
    except (RuntimeError, AssertionError) as exc:
        text = str(exc).lower()
        if device.type == "cuda" or not any(hint in text for hint in _CUDA_ONLY_HINTS):
            raise
        raise JobError(
            "model_requires_cuda",
            f"This SAM3 job needs a CUDA GPU; on {device.type} sam3 fails with: "
            f"{str(exc).splitlines()[0][:200]}. Run it on a machine with a CUDA GPU "
            "(set 'device: cuda' in the config).",
            field="model",
        ) from exc
