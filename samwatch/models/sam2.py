"""SAM2 and SAM2.1 image models (sam2_t, sam2_s, sam2_bp, sam2_l) with sam2's SAM2ImagePredictor.

The same shape as the SAM1 adapter: every prompt of a sidecar is decoded against one image
embedding, which is kept (keyed by the pixels) for later jobs on the same image. sam2's
``predict`` takes a batch of equal-shape prompts natively, so one call serves both the
one-at-a-time CPU path and the batched GPU path.

A checkpoint does not say which SAM2 version it is, and the versions need different Hydra configs
(SAM2.1 adds a few tensors: ``no_obj_embed_spatial``, ``obj_ptr_tpos_proj``). The config is
``spec.config`` when the registry gives one; otherwise "sam2.1" in the file name or URL means
SAM2.1 (the official files are named ``sam2.1_hiera_*.pt`` and ``sam2_hiera_*.pt``), and when the
state does not fit that config the other version's is tried, so a renamed file still loads.
``config_used`` records the config that loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

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

_SIZES = {"sam2_t": "t", "sam2_s": "s", "sam2_bp": "b+", "sam2_l": "l"}
_EMBEDDING_ATTRS = ("_features", "_orig_hw")



def _named_version(source_name: str) -> str:
    return "2.1" if "sam2.1" in source_name.lower() else "2"


def sam2_config_for(model_type: str, source_name: str, version: str | None = None) -> str:
    """The Hydra config for ``model_type``: SAM2.1's if ``version`` is "2.1", SAM2's if "2";
    by default decided by whether ``source_name`` (a file name or URL) mentions sam2.1."""
    size = _SIZES[model_type]
    if (version or _named_version(source_name)) == "2.1":
        return f"configs/sam2.1/sam2.1_hiera_{size}.yaml"
    return f"configs/sam2/sam2_hiera_{size}.yaml"


def _configs_to_try(spec: LoadSpec) -> list[str]:
    if spec.config:
        return [spec.config]
    names = f"{spec.checkpoint.name} {spec.source}"
    named = _named_version(names)
    other = "2" if named == "2.1" else "2.1"
    return [sam2_config_for(spec.model_type, names, version) for version in (named, other)]


def build_model(spec: LoadSpec, state: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """The SAM2 model holding ``state`` on the CPU, and the config it was built from."""
    failures: list[JobError] = []
    for config in _configs_to_try(spec):
        model = build_sam2(config, None, device="cpu", mode="eval")
        try:
            load_state_dict_strict(model, state, spec)
        except JobError as error:
            failures.append(error)
            continue
        return model, config
    raise failures[0]  # the named version's complaint is the one that helps


class Adapter(PromptAdapter):
    """sam2's image predictor behind the samwatch adapter protocol."""

    def __init__(self) -> None:
        self.model: Any = None
        self.predictor: Any = None
        self.config_used: str | None = None
        self.device = torch.device("cpu")
        self._memo = EmbeddingMemo(_EMBEDDING_ATTRS, 4)

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None:
        state = load_checkpoint(spec)
        model, self.config_used = build_model(spec, state)
        self.model = model.to(device)
        self.predictor = SAM2ImagePredictor(self.model)
        self.device = device
        self._memo = EmbeddingMemo(_EMBEDDING_ATTRS, embedding_cache)

    def parameter_bytes(self) -> int:
        return parameter_bytes(self.model)

    def _encoder_owner(self) -> torch.nn.Module:
        return self.model

    def _encoder_input_shape(self) -> tuple[int, ...]:
        return (1, 3, self.model.image_size, self.model.image_size)

    def _decoder_plan(self) -> DecoderPlan:
        side = self.model.sam_image_embedding_size
        return "sam_mask_decoder", decoders.sam2, (1, self.model.sam_prompt_embed_dim, side, side)

    def _track(self, ctx: RunContext) -> list[Detection]:
        from samwatch.models.sam2_video import track

        return track(self, ctx)

    def _automask(self, ctx: RunContext, embedding: dict[str, Any]) -> list[Detection]:
        from samwatch.models.automask import generate_sam2

        return generate_sam2(self.model, ctx, embedding=embedding)

    def _mark_image_set(self) -> None:
        self.predictor._is_image_set = True
        self.predictor._is_batch = False

    @torch.inference_mode()
    def _decode_batch(
        self, batch: PromptBatch, multimask: bool, prompt_masks: list[np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(prompts × masks × H × W, prompts × masks) for prompts of one shape."""
        prompts = [prompt for _, prompt in batch]
        first = prompts[0]
        has_mask = mask_at(prompt_masks, batch[0][0]) is not None
        masks, scores, _ = self.predictor.predict(
            point_coords=np.array([p.points for p in prompts], dtype=np.float32) if first.points else None,
            point_labels=np.array([p.labels for p in prompts]) if first.points else None,
            box=np.array([p.bbox for p in prompts], dtype=np.float32) if first.bbox is not None else None,
            mask_input=np.stack([mask_at(prompt_masks, i) for i, _ in batch]) if has_mask else None,
            multimask_output=multimask,
        )
        if len(batch) == 1:  # predict squeezes a batch of one away
            return masks[None], scores[None]
        return masks, scores
