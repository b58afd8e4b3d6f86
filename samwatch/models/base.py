"""The adapter protocol every model family implements, and what flows through it.

An adapter is set up once per (model type, weights) with ``setup`` and then serves many jobs
through ``run``; it may keep per-image state (embeddings) between jobs, keyed by
``RunContext.image_key``, so a re-run with a changed sidecar skips the image encoder.
Adapters know nothing of files, folders or outputs: the job runner hands them pixels and a
validated sidecar, and turns their :class:`Detection` list into GeoJSON.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from samwatch.errors import JobError
from samwatch.models.accel import EAGER, Accelerator, DecoderExport, module_path, weights_identity
from samwatch.sidecar import Prompt, Sidecar
from samwatch.vocab import LoadSpec

ProgressFn = Callable[[str, float], None]
"""``progress(stage, fraction)``: fraction in [0, 1] of that stage; raises JobCancelled."""


@dataclass
class Detection:
    """One mask an adapter found; becomes one GeoJSON feature (if not empty)."""

    mask: np.ndarray  # bool; the whole input image, or a crop of it placed by ``origin``/``scale``
    score: float
    prompt_idx: int | None = None  # index into the sidecar's prompts (None: automask/text)
    mask_idx: int = 0  # which of a prompt's multimask outputs
    frame: int | None = None  # frame index for stacks and videos
    obj_id: int | None = None  # video object id
    label: str | None = None
    color: tuple[int, int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. stability_score
    # Where the mask lies in the image's level-0 pixels: mask pixel (0, 0) covers
    # [origin, origin + scale)². Tiles, regions, pyramid levels and bounding-box crops all
    # say where they are this way, so geometry alone maps masks to level-0 coordinates.
    origin: tuple[float, float] = (0, 0)
    scale: float = 1.0

    def cropped(self) -> Detection:
        """This detection with its mask cut to the box of its nonzero pixels (always a copy,
        so the full-frame mask can be freed): what a job holds per mask is then the object's size,
        not the image's. An empty mask becomes one empty pixel."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        if rows.size == 0:
            y0, y1, x0, x1 = 0, 1, 0, 1
        else:
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            cols = np.flatnonzero(self.mask[y0:y1].any(axis=0))
            x0, x1 = int(cols[0]), int(cols[-1]) + 1
        origin = (self.origin[0] + x0 * self.scale, self.origin[1] + y0 * self.scale)
        return replace(self, mask=self.mask[y0:y1, x0:x1].copy(), origin=origin)


@dataclass
class RunContext:
    """Everything one job gives the adapter."""

    sidecar: Sidecar
    image: np.ndarray | None  # RGB uint8 H×W×3 for image jobs
    image_key: str  # content identity of the pixels (for embedding reuse)
    frames: Any = None  # a samwatch.media.Media for video jobs
    prompt_masks: list[np.ndarray | None] = field(default_factory=list)  # low-res logits per prompt
    progress: ProgressFn = lambda stage, fraction: None
    prompt_batch_size: int = 1
    scratch_dir: Path | None = None  # a private temporary folder for this job
    # Embeddings outliving the process (samwatch.tiling.cache): consulted after the memo.
    embedding_store: Any = None


class ModelAdapter(Protocol):
    """One model family behind one small protocol (LitServe-style ``setup``/``run``)."""

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None: ...

    def run(self, ctx: RunContext) -> Iterable[Detection]:
        """The detections, possibly lazily: the job runner traces each as it comes."""
        ...

    def parameter_bytes(self) -> int: ...


T = TypeVar("T")


class LruCache(Generic[T]):
    """A tiny bounded LRU map; adapters keep image embeddings in one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, T] = OrderedDict()

    def get(self, key: str) -> T | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, value: T) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, Any], spec: LoadSpec) -> None:
    """Load ``state`` into ``model`` or refuse with an error naming the type."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise JobError(
            "weights_wrong_architecture",
            f"The weights {spec.weights_name!r} ({spec.source}) do not fit model type "
            f"{spec.model_type}: {first[0].strip()}. Register them under the type they were trained for.",
            field="weights",
        ) from None
    if missing or unexpected:
        raise JobError(
            "weights_wrong_architecture",
            f"The weights {spec.weights_name!r} ({spec.source}) do not fit model type {spec.model_type}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(e.g. {(list(missing) + list(unexpected))[:2]}). Register them under the type they were trained for.",
            field="weights",
        )


def select_masks(
    masks: np.ndarray, scores: np.ndarray, choice: str
) -> list[tuple[int, np.ndarray, float]]:
    """Apply samapi's output types to one prompt's masks: ``(mask_idx, mask, score)``."""
    indices = list(range(len(masks)))
    if choice in ("single", "all") or len(masks) == 1:
        chosen = indices
    elif choice == "best":
        chosen = [int(np.argmax(scores))]
    else:
        areas = [int(np.count_nonzero(mask)) for mask in masks]
        pick = max if choice == "largest" else min
        chosen = [pick(indices, key=lambda i: areas[i])]
    return [(i, masks[i].astype(bool, copy=False), float(scores[i])) for i in chosen]


def check_inside(
    bbox: tuple[float, float, float, float] | None,
    points: list[tuple[float, float]],
    width: int,
    height: int,
    *,
    where: str,
    surface: str = "image",
) -> None:
    """A box and points must lie on the image (or frame); say which one is off and where."""
    if bbox is not None:
        check_box(bbox, width, height, field=f"{where}.bbox", surface=surface)
    for point_index, (x, y) in enumerate(points):
        if not (0 <= x <= width and 0 <= y <= height):
            raise JobError(
                "prompt_out_of_bounds",
                f"The point {where}.points[{point_index}] ({x}, {y}) lies outside the {width}×{height} {surface}.",
                field=f"{where}.points.{point_index}",
            )


def check_box(box: tuple[float, float, float, float], width: int, height: int, *, field: str, surface: str = "image") -> None:
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise JobError(
            "prompt_out_of_bounds",
            f"The box {field} {list(box)} (x1, y1, x2, y2) lies outside the {width}×{height} {surface}; "
            f"coordinates are pixels of the {surface} as stored, origin top-left.",
            field=field,
        )


def check_prompt_bounds(sidecar: Sidecar, width: int, height: int) -> None:
    for index, prompt in enumerate(sidecar.prompts):
        check_inside(prompt.bbox, prompt.points, width, height, where=f"prompts.{index}")


PromptBatch = list[tuple[int, Prompt]]
DecoderPlan = tuple[str, Callable[..., DecoderExport], tuple[int, ...]]
"""The model attribute holding the mask decoder, how it is exported (``accel.decoders``), and
one image's embedding shape."""
DecodeBatch = Callable[[PromptBatch, bool, list[np.ndarray | None]], tuple[np.ndarray, np.ndarray]]
"""``decode(batch, multimask, prompt_masks) -> (prompts × masks × H × W, prompts × masks)``."""


class PromptAdapter:
    """The flow SAM1 and SAM2 image adapters share: check prompts, encode once, decode them all.

    A family supplies ``predictor``, ``_memo``, ``_mark_image_set`` (how its predictor records
    that an image is set), ``_decode_batch`` and ``_automask``.
    """

    predictor: Any
    _memo: EmbeddingMemo

    def _encoder_owner(self) -> torch.nn.Module:
        """The model whose ``image_encoder`` the predictor calls."""
        raise NotImplementedError

    def _encoder_input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _decoder_plan(self) -> DecoderPlan | None:
        """Where the mask decoder is and how to export it; None: it stays eager."""
        return None

    def accelerate(self, accelerator: Accelerator, spec: LoadSpec) -> None:
        """Put ``accelerator``'s fast image encoder (and mask decoder) in front of the eager ones."""
        owner = self._encoder_owner()
        weights_sha = weights_identity(spec.checkpoint, spec.sha256)
        owner.image_encoder = accelerator.wrap(
            owner.image_encoder, model_type=spec.model_type, weights_sha=weights_sha,
            input_shape=self._encoder_input_shape(),
        )
        plan = self._decoder_plan()
        if plan is not None:
            attribute, family, embedding_shape = plan
            setattr(owner, attribute, accelerator.wrap_decoder(
                getattr(owner, attribute), family, model_type=spec.model_type, weights_sha=weights_sha,
                embedding_shape=embedding_shape,
            ))

    @property
    def encoder_path(self) -> str:
        """What encoded the last image: ``eager``, or the accelerated path's name."""
        return module_path(self._encoder_owner().image_encoder)

    @property
    def decoder_path(self) -> str:
        """What decoded the last prompt: ``eager`` or ``onnxruntime``."""
        plan = self._decoder_plan()
        return module_path(getattr(self._encoder_owner(), plan[0])) if plan is not None else EAGER

    def run(self, ctx: RunContext) -> Iterable[Detection]:
        mode = ctx.sidecar.mode
        if mode == "video":
            return self._track(ctx)
        if mode == "prompts":  # before encoding: a bad prompt should not cost an embedding
            check_prompt_bounds(ctx.sidecar, ctx.image.shape[1], ctx.image.shape[0])
        self.set_image(ctx)
        if mode == "automask":
            return self._automask(ctx, self._memo.capture(self.predictor))
        return decode_prompts(ctx, self._decode_batch)

    @torch.inference_mode()
    def set_image(self, ctx: RunContext) -> None:
        """Encode the image, or restore its cached embedding when the pixels are unchanged."""
        self._memo.ensure(self.predictor, ctx, lambda: self.predictor.set_image(ctx.image), self._mark_image_set)

    def _track(self, ctx: RunContext) -> list[Detection]:
        raise JobError("sidecar_invalid", "This model cannot track through frames; use a sam2_* or sam3 model.",
                       field="model")

    def _mark_image_set(self) -> None:
        raise NotImplementedError

    def _decode_batch(self, batch: PromptBatch, multimask: bool, prompt_masks: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _automask(self, ctx: RunContext, embedding: dict[str, Any]) -> list[Detection]:
        raise NotImplementedError


class EmbeddingMemo:
    """Which image a predictor holds, and the embeddings of recent images (by pixel identity).

    ``attrs`` are the predictor attributes that make up an embedding; restoring them is what
    lets a job whose sidecar changed but whose image did not skip the image encoder.
    """

    def __init__(self, attrs: tuple[str, ...], capacity: int) -> None:
        self.attrs = attrs
        self._cache: LruCache[dict[str, Any]] = LruCache(capacity)
        self._current: str | None = None

    def capture(self, predictor: Any) -> dict[str, Any]:
        return {name: getattr(predictor, name) for name in self.attrs}

    def ensure(self, predictor: Any, ctx: RunContext, encode: Callable[[], None], mark_set: Callable[[], None]) -> None:
        if self._current == ctx.image_key:
            return
        cached = self._cache.get(ctx.image_key)
        store = ctx.embedding_store
        if cached is None and store is not None:
            cached = store.load(ctx.image_key, predictor.device)
            if cached is not None:
                self._cache.put(ctx.image_key, cached)
        if cached is not None:
            for name, value in cached.items():
                setattr(predictor, name, value)
            mark_set()
        else:
            ctx.progress("encoding image", 0.0)
            encode()
            captured = self.capture(predictor)
            self._cache.put(ctx.image_key, captured)
            if store is not None:
                store.save(ctx.image_key, captured)
        self._current = ctx.image_key


def mask_at(prompt_masks: list[np.ndarray | None], index: int) -> np.ndarray | None:
    """Prompt ``index``'s low-res mask logits as SAM's 1×256×256 ``mask_input``, or None."""
    mask = prompt_masks[index] if index < len(prompt_masks) else None
    return None if mask is None else mask[None].astype(np.float32)


#: Full-resolution mask pixels one prompt batch may decode at once. The decoders upsample
#: to float32 at the image's size, so on a huge image a GPU-sized batch would need gigabytes
#: (32 prompts x 3 masks x 8192² x 4 bytes = 24 GiB); batches shrink to fit instead.
MASK_PIXEL_BUDGET = 1 << 27


def prompt_batches(
    prompts: list[Prompt], prompt_masks: list[np.ndarray | None], size: int
) -> Iterator[PromptBatch]:
    """Runs of consecutive prompts of one shape (a batch tensor needs equal shapes)."""

    def shape(index: int, prompt: Prompt) -> tuple[int, bool, bool]:
        return (len(prompt.points), prompt.bbox is not None, mask_at(prompt_masks, index) is not None)

    batch: PromptBatch = []
    for index, prompt in enumerate(prompts):
        if batch and (len(batch) >= size or shape(*batch[0]) != shape(index, prompt)):
            yield batch
            batch = []
        batch.append((index, prompt))
    if batch:
        yield batch


def batch_size_for(requested: int, image_hw: tuple[int, int], masks_per_prompt: int) -> int:
    """``requested``, or fewer so that one batch's masks fit ``MASK_PIXEL_BUDGET``."""
    per_prompt = image_hw[0] * image_hw[1] * masks_per_prompt
    return max(1, min(requested, MASK_PIXEL_BUDGET // max(1, per_prompt)))


def decode_prompts(ctx: RunContext, decode_batch: DecodeBatch) -> Iterator[Detection]:
    """Every prompt against the image already set, in runs of equal shape of up to
    ``ctx.prompt_batch_size``, with the sidecar's mask choice applied; family-independent.

    Lazy: each detection (its mask cropped to the object) is handed on before the next batch
    is decoded, so a job's memory does not grow with its number of prompts.
    """
    prompts = ctx.sidecar.prompts
    choice = ctx.sidecar.mask_choice
    size = batch_size_for(ctx.prompt_batch_size, ctx.image.shape[:2], 1 if choice == "single" else 3)
    done = 0
    for batch in prompt_batches(prompts, ctx.prompt_masks, size):
        yield from _cropped_detections(batch, decode_batch(batch, choice != "single", ctx.prompt_masks), choice)
        done += len(batch)
        ctx.progress("decoding prompts", done / len(prompts))


def _cropped_detections(
    batch: PromptBatch, decoded: tuple[np.ndarray, np.ndarray], choice: str
) -> list[Detection]:
    """One batch's detections, cropped; the full-frame batch arrays are freed on return."""
    masks, scores = decoded
    return [
        Detection(mask=mask, score=score, prompt_idx=index, mask_idx=mask_idx,
                  label=prompt.label, color=prompt.color).cropped()
        for (index, prompt), prompt_masks, prompt_scores in zip(batch, masks, scores)
        for mask_idx, mask, score in select_masks(prompt_masks, prompt_scores, choice)
    ]
