"""SAM3 (the ``sam3`` package): concept prompts, text and/or exemplar boxes, on images and videos.

Image jobs ("text" mode) follow samapi's ``/sam/sam3/``: ``Sam3Processor.set_image``, then
``set_confidence_threshold``, ``set_text_prompt`` and one ``add_geometric_prompt`` per box
(normalised cx, cy, w, h); every instance above the threshold becomes one Detection. Each call
reruns sam3's grounding head (seconds on a CPU), so k boxes cost k (+1 with text) passes.
The backbone output of ``set_image`` (213 MiB per image, float32 features and position
encodings at 288², 144² and 72²) is kept in an LRU cache keyed by ``image_key``, so a
re-run with a changed sidecar skips the image encoder.

Video jobs (``sam3_video``) build sam3's video model on the first one, sharing this model's
tensors.

sam3 is written for CUDA; on other devices every sam3 call runs inside
:func:`samwatch.models.sam3_device.on_device`, which redirects its CUDA-only calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image

from samwatch.errors import JobError
from samwatch.models.base import Detection, LruCache, ModelAdapter, RunContext, check_box, load_state_dict_strict
from samwatch.models.sam3_device import on_device
from samwatch.models.weights_io import load_checkpoint
from samwatch.sidecars.schema import Box
from samwatch.vocab import LoadSpec

BPE_PATH = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
DETECTOR = "detector."
# Parts of the official checkpoint that only the video model has: its tracker, and the neck
# that feeds the tracker from the shared backbone.
VIDEO_ONLY_PREFIXES = ("tracker.", "detector.backbone.vision_backbone.sam2_convs.")
_CUDA_ONLY_HINTS = ("cuda", "nvidia", "nccl", "triton")


def import_sam3(name: str) -> ModuleType:
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
    return import_sam3("sam3.model_builder").build_sam3_image_model(
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
    return import_sam3("sam3.model.sam3_image_processor").Sam3Processor(model, device=device)


class Adapter(ModelAdapter):
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
        with on_device(device), cuda_failures(device):
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
            from samwatch.models.sam3_video import run_video  # the video model only when a job needs it

            return run_video(self, ctx)
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
        with on_device(self.device), cuda_failures(self.device), torch.inference_mode():
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


# -- prompts ----------------------------------------------------------------------------


def normalized_cxcywh(box_xyxy: Box, width: int, height: int) -> list[float]:
    """Pixel x1, y1, x2, y2 -> sam3's normalised cx, cy, w, h (samapi's _to_norm_box_cxcywh)."""
    x1, y1, x2, y2 = box_xyxy
    w, h = x2 - x1, y2 - y1
    return [(x1 + 0.5 * w) / width, (y1 + 0.5 * h) / height, w / width, h / height]


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


# -- helpers ----------------------------------------------------------------------------


def _copy_containers(value: Any) -> Any:
    """Dicts and lists copied all the way down; tensors and other leaves shared."""
    if isinstance(value, dict):
        return {key: _copy_containers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_containers(item) for item in value]
    return value


@contextmanager
def cuda_failures(device: torch.device) -> Iterator[None]:
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
