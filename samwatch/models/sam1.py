"""SAM (segment-anything: vit_h, vit_l, vit_b) and MobileSAM (mobile_sam: vit_t).

Both packages expose the same ``SamPredictor``; only the builders differ. Every prompt of a
sidecar is decoded against one image embedding. On a CPU the decoder is fastest one prompt at
a time (batching repeats the embedding per prompt); on a GPU prompts of the same shape are
decoded in batches of ``prompt_batch_size``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from samwatch.errors import JobError
from samwatch.models.accel import decoders
from samwatch.models.base import (
    DecoderPlan,
    Detection,
    EmbeddingMemo,
    PromptAdapter,
    PromptBatch,
    RunContext,
    load_state_dict_strict,
    mask_at,
    parameter_bytes,
)
from samwatch.vocab import LoadSpec
from samwatch.models.weights_io import load_checkpoint
from samwatch.families import FAMILY_OF

_EMBEDDING_ATTRS = ("features", "original_size", "input_size")
_INPUT_SIDE = 1024


def build_predictor(model_type: str, state: dict[str, Any] | None, spec: LoadSpec | None = None) -> Any:
    """A ``SamPredictor`` for ``model_type`` with ``state`` loaded (None: random weights)."""
    package_name = FAMILY_OF[model_type].package
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


class Adapter(PromptAdapter):
    """segment-anything / MobileSAM behind the samwatch adapter protocol."""

    def __init__(self) -> None:
        self.predictor: Any = None
        self.device = torch.device("cpu")
        self._memo = EmbeddingMemo(_EMBEDDING_ATTRS, 4)

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None:
        state = load_checkpoint(spec)
        self.predictor = build_predictor(spec.model_type, state, spec)
        self.predictor.model.to(device)
        self.device = device
        self._memo = EmbeddingMemo(_EMBEDDING_ATTRS, embedding_cache)

    def parameter_bytes(self) -> int:
        return parameter_bytes(self.predictor.model)

    def set_image(self, ctx: RunContext) -> None:
        height, width = ctx.image.shape[:2]
        # SAM scales the longest side to 1024 and keeps the aspect: past 1:2048 the short side
        # rounds to 0 pixels. (SAM2 and SAM3 scale to a square and take any aspect.)
        if min(height, width) * 2 * _INPUT_SIDE < max(height, width):
            raise JobError(
                "image_shape_unsupported",
                f"The image is {width}x{height} pixels: thinner than 1:{2 * _INPUT_SIDE}, which SAM and MobileSAM "
                f"cannot take (its short side would shrink below one pixel at their {_INPUT_SIDE}-pixel input); "
                "crop it into squarer pieces, or use a sam2_* model.",
                field="model",
            )
        super().set_image(ctx)

    def _encoder_owner(self) -> torch.nn.Module:
        return self.predictor.model

    def _encoder_input_shape(self) -> tuple[int, ...]:
        size = self.predictor.model.image_encoder.img_size
        return (1, 3, size, size)

    def _decoder_plan(self) -> DecoderPlan:
        prompt_encoder = self.predictor.model.prompt_encoder
        return "mask_decoder", decoders.sam1, (1, prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)

    def _automask(self, ctx: RunContext, embedding: dict[str, Any]) -> list[Detection]:
        from samwatch.models.automask import generate_sam1

        return generate_sam1(self.predictor, ctx, embedding=embedding)

    def _mark_image_set(self) -> None:
        self.predictor.is_image_set = True

    @torch.inference_mode()
    def _decode_batch(
        self, batch: PromptBatch, multimask: bool, prompt_masks: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(batch) == 1:
            index, prompt = batch[0]
            masks, scores, _ = self.predictor.predict(
                point_coords=np.array(prompt.points, dtype=np.float32) if prompt.points else None,
                point_labels=np.array(prompt.labels) if prompt.points else None,
                box=np.array(prompt.bbox, dtype=np.float32) if prompt.bbox is not None else None,
                mask_input=mask_at(prompt_masks, index),
                multimask_output=multimask,
            )
            return masks[None], scores[None]
        return self._decode_torch_batch(batch, multimask, prompt_masks)

    def _decode_torch_batch(
        self, batch: PromptBatch, multimask: bool, prompt_masks: list[np.ndarray | None]
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
        if mask_at(prompt_masks, batch[0][0]) is not None:
            mask_input = torch.as_tensor(
                np.stack([mask_at(prompt_masks, i) for i, _ in batch]), device=self.device
            )
        masks, scores, _ = self.predictor.predict_torch(
            coords, labels, boxes=boxes, mask_input=mask_input, multimask_output=multimask
        )
        return masks.cpu().numpy(), scores.float().cpu().numpy()
