"""How each family's mask decoder ``predict_masks`` is exported and fed to ONNX Runtime.

The runtime computes ``predict_masks`` for one image's embedding: the number of prompts and
of sparse tokens per prompt are the export's free axes. A call it was not built for (another
embedding size, a batch of images, a prompt without sparse tokens) is left to eager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Feeds = Callable[..., tuple[torch.Tensor, ...] | None]


@dataclass
class DecoderExport:
    module: torch.nn.Module  # forward(*inputs) = the decoder's predict_masks
    inputs: dict[str, torch.Tensor]  # example inputs, by name
    outputs: list[str]
    feeds: Feeds  # predict_masks's arguments -> the export's inputs, or None when it does not fit

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        prompts = {0: "prompts"}
        # ``dense`` may also be 1 × 1 per prompt (see unbroadcast); other inputs are per image.
        return {"sparse": {0: "prompts", 1: "tokens"}, "dense": {0: "prompts", 2: "height", 3: "width"},
                **{name: prompts for name in self.outputs}}


def unbroadcast(dense: torch.Tensor) -> torch.Tensor:
    """Without a mask prompt the dense embedding is one vector expanded over the grid (and the
    prompts); the decoder only adds it to the image embedding, so the vector itself serves:
    the same sums, without copying 4 MB per prompt into the runtime (~1-2 ms of a 20 ms decode)."""
    if dense.stride(2) == 0 and dense.stride(3) == 0:
        dense = dense[:, :, :1, :1]
    if dense.shape[0] > 1 and dense.stride(0) == 0:
        dense = dense[:1]
    return dense


def _fits(embedding_shape: tuple[int, ...], image_embeddings: torch.Tensor, image_pe: torch.Tensor,
          sparse: torch.Tensor) -> bool:
    return (tuple(image_embeddings.shape) == embedding_shape and tuple(image_pe.shape) == embedding_shape
            and sparse.shape[1] > 0)


def _examples(embedding_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {"image_embeddings": torch.randn(embedding_shape), "image_pe": torch.randn(embedding_shape),
            "sparse": torch.randn(1, 2, embedding_shape[1]), "dense": torch.randn(embedding_shape)}


class _Sam1PredictMasks(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.predict_masks(image_embeddings, image_pe, sparse, dense)


def sam1(decoder: torch.nn.Module, embedding_shape: tuple[int, ...]) -> DecoderExport:
    """segment-anything / MobileSAM: ``predict_masks(embeddings, pe, sparse, dense)``."""
    def feeds(image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
              dense_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if not _fits(embedding_shape, image_embeddings, image_pe, sparse_prompt_embeddings):
            return None
        return image_embeddings, image_pe, sparse_prompt_embeddings, unbroadcast(dense_prompt_embeddings)

    return DecoderExport(_Sam1PredictMasks(decoder), _examples(embedding_shape), ["masks", "iou_pred"], feeds)


class _Sam2PredictMasks(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, high_res_s0: torch.Tensor, high_res_s1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # repeat_image: one image's embedding for every prompt (the identity for a single prompt)
        return self.decoder.predict_masks(image_embeddings, image_pe, sparse, dense, True, [high_res_s0, high_res_s1])


def sam2(decoder: torch.nn.Module, embedding_shape: tuple[int, ...]) -> DecoderExport:
    """SAM2: ``predict_masks(embeddings, pe, sparse, dense, repeat_image, high_res_features)``,
    the high-resolution features at 4× and 2× the embedding's side."""
    channels, height, width = embedding_shape[1:]

    def feeds(image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
              dense_prompt_embeddings: torch.Tensor, repeat_image: bool,
              high_res_features: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...] | None:
        if high_res_features is None or not _fits(embedding_shape, image_embeddings, image_pe, sparse_prompt_embeddings):
            return None
        return (image_embeddings, image_pe, sparse_prompt_embeddings, unbroadcast(dense_prompt_embeddings),
                *high_res_features)

    inputs = _examples(embedding_shape) | {"high_res_s0": torch.randn(1, channels // 8, 4 * height, 4 * width),
                                           "high_res_s1": torch.randn(1, channels // 4, 2 * height, 2 * width)}
    return DecoderExport(_Sam2PredictMasks(decoder), inputs,
                         ["masks", "iou_pred", "mask_tokens", "object_score_logits"], feeds)
