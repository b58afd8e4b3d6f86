"""SAM (segment-anything: vit_h, vit_l, vit_b) and MobileSAM (mobile_sam: vit_t).

Both packages expose the same ``SamPredictor``; only the builders differ. Every prompt of a
sidecar is decoded against one image embedding. On a CPU the decoder is fastest one prompt at
a time (batching repeats the embedding per prompt); on a GPU prompts of the same shape are
decoded in batches of ``prompt_batch_size``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from samwatch.errors import JobError
from samwatch.models.base import (
    Detection,
    LoadSpec,
    LruCache,
    RunContext,
    check_prompt_bounds,
    load_state_dict_strict,
    parameter_bytes,
    select_masks,
)
from samwatch.models.weights_io import load_checkpoint
from samwatch.sidecar import Prompt

MODES = frozenset({"prompts", "automask"})
_PACKAGE = {"vit_t": "mobile_sam", "vit_b": "segment_anything", "vit_l": "segment_anything", "vit_h": "segment_anything"}
_EMBEDDING_ATTRS = ("features", "original_size", "input_size")


def build_predictor(model_type: str, state: dict[str, Any] | None, spec: LoadSpec | None = None) -> Any:
    """A ``SamPredictor`` for ``model_type`` with ``state`` loaded (None: random weights)."""
    package_name = _PACKAGE[model_type]
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        raise JobError(
            "model_not_installed",
            f"Model type {model_type} needs the Python package {package_name!r}; install samwatch with its dependencies.",
            field="model",
        ) from None
    model = getattr(package, f"build_sam_{model_type}")(checkpoint=None)
    if state is not None and spec is not None:
        load_state_dict_strict(model, state, spec)
    model.eval()
    return package.SamPredictor(model)


class Adapter:
    """segment-anything / MobileSAM behind the samwatch adapter protocol."""

    modes = MODES

    def __init__(self) -> None:
        self.predictor: Any = None
        self.device = torch.device("cpu")
        self._embeddings: LruCache[dict[str, Any]] = LruCache(4)
        self._current_key: str | None = None

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None:
        state = load_checkpoint(spec)
        self.predictor = build_predictor(spec.model_type, state, spec)
        self.predictor.model.to(device)
        self.device = device
        self._embeddings = LruCache(embedding_cache)

    def parameter_bytes(self) -> int:
        return parameter_bytes(self.predictor.model)

    def run(self, ctx: RunContext) -> list[Detection]:
        if ctx.sidecar.mode == "automask":
            from samwatch.models.automask import generate_sam1

            return generate_sam1(self.predictor, ctx)
        self.set_image(ctx)
        check_prompt_bounds(ctx.sidecar, ctx.image.shape[1], ctx.image.shape[0])
        return self.decode_prompts(ctx)

    @torch.inference_mode()
    def set_image(self, ctx: RunContext) -> None:
        """Encode the image, or restore its cached embedding when the pixels are unchanged."""
        if self._current_key == ctx.image_key and self.predictor.is_image_set:
            return
        cached = self._embeddings.get(ctx.image_key)
        if cached is not None:
            for name, value in cached.items():
                setattr(self.predictor, name, value)
            self.predictor.is_image_set = True
        else:
            ctx.progress("encoding image", 0.0)
            self.predictor.set_image(ctx.image)
            self._embeddings.put(
                ctx.image_key, {name: getattr(self.predictor, name) for name in _EMBEDDING_ATTRS}
            )
        self._current_key = ctx.image_key

    @torch.inference_mode()
    def decode_prompts(self, ctx: RunContext) -> list[Detection]:
        prompts = ctx.sidecar.prompts
        multimask = ctx.sidecar.mask_choice != "single"
        detections: list[Detection] = []
        done = 0
        for batch in _batches(prompts, ctx.prompt_masks, ctx.prompt_batch_size):
            masks, scores = self._decode_batch(batch, multimask, ctx.prompt_masks)
            for (index, prompt), prompt_masks, prompt_scores in zip(batch, masks, scores):
                for mask_idx, mask, score in select_masks(prompt_masks, prompt_scores, ctx.sidecar.mask_choice):
                    detections.append(
                        Detection(mask=mask, score=score, prompt_idx=index, mask_idx=mask_idx,
                                  label=prompt.label, color=prompt.color)
                    )
            done += len(batch)
            ctx.progress("decoding prompts", done / len(prompts))
        return detections

    def _decode_batch(
        self, batch: list[tuple[int, Prompt]], multimask: bool, prompt_masks: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) == 1:
            index, prompt = batch[0]
            masks, scores, _ = self.predictor.predict(
                point_coords=np.array(prompt.points, dtype=np.float32) if prompt.points else None,
                point_labels=np.array(prompt.labels) if prompt.points else None,
                box=np.array(prompt.bbox, dtype=np.float32) if prompt.bbox is not None else None,
                mask_input=_mask_at(prompt_masks, index),
                multimask_output=multimask,
            )
            return masks[None], scores[None]
        return self._decode_torch_batch(batch, multimask, prompt_masks)

    def _decode_torch_batch(
        self, batch: list[tuple[int, Prompt]], multimask: bool, prompt_masks: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        transform = self.predictor.transform
        size = self.predictor.original_size
        first = batch[0][1]
        coords = labels = boxes = mask_input = None
        if first.points:
            points = np.array([p.points for _, p in batch], dtype=np.float32)
            coords = torch.as_tensor(transform.apply_coords(points, size), device=self.device)
            labels = torch.as_tensor(np.array([p.labels for _, p in batch]), device=self.device)
        if first.bbox is not None:
            box_array = np.array([p.bbox for _, p in batch], dtype=np.float32)
            boxes = torch.as_tensor(transform.apply_boxes(box_array, size), device=self.device)
        if _mask_at(prompt_masks, batch[0][0]) is not None:
            mask_input = torch.as_tensor(
                np.stack([_mask_at(prompt_masks, i) for i, _ in batch]), device=self.device
            )
        masks, scores, _ = self.predictor.predict_torch(
            coords, labels, boxes=boxes, mask_input=mask_input, multimask_output=multimask
        )
        return masks.cpu().numpy(), scores.float().cpu().numpy()


def _mask_at(prompt_masks: list[np.ndarray | None], index: int) -> np.ndarray | None:
    mask = prompt_masks[index] if index < len(prompt_masks) else None
    return None if mask is None else mask[None].astype(np.float32)


def _shape_key(prompt: Prompt, has_mask: bool) -> tuple[int, bool, bool]:
    return (len(prompt.points), prompt.bbox is not None, has_mask)


def _batches(
    prompts: list[Prompt], prompt_masks: list[np.ndarray | None], size: int
) -> Iterator[list[tuple[int, Prompt]]]:
    """Runs of consecutive prompts of one shape (a batch tensor needs equal shapes)."""
    batch: list[tuple[int, Prompt]] = []
    for index, prompt in enumerate(prompts):
        key = _shape_key(prompt, _mask_at(prompt_masks, index) is not None)
        if batch and (len(batch) >= size or _shape_key(batch[0][1], _mask_at(prompt_masks, batch[0][0]) is not None) != key):
            yield batch
            batch = []
        batch.append((index, prompt))
    if batch:
        yield batch
