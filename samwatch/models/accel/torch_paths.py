"""PyTorch fast paths for the image encoder, after segment-anything-fast.

- ``sdpa``: the encoders' hand-written attention (SAM ViT with decomposed relative positions,
  MobileSAM's TinyViT with its attention biases) becomes ``scaled_dot_product_attention``
  with the positional term as its additive mask — the same function, but flash or
  memory-efficient kernels on a GPU. SAM2's Hiera already calls it.
- ``bf16``/``fp16``: the encoder runs under autocast and hands float32 to the decoder, which
  stays exact.
- ``compile``: ``torch.compile`` of all that (``max-autotune`` on CUDA, as
  segment-anything-fast does); it compiles on the first image, so errors surface there and
  fall back to eager.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree


def _sam_vit_attention(self: Any, x: torch.Tensor) -> torch.Tensor:
    from segment_anything.modeling.image_encoder import get_rel_pos

    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, batch * self.num_heads, height * width, -1).unbind(0)
    bias = None
    if self.use_rel_pos:
        rel_h_table = get_rel_pos(height, height, self.rel_pos_h)
        rel_w_table = get_rel_pos(width, width, self.rel_pos_w)
        grid_q = q.reshape(q.shape[0], height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], height * width, height * width)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def _tiny_vit_attention(self: Any, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=self.scale
    )
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dh))


def _attention_forwards() -> dict[type, Callable[..., torch.Tensor]]:
    forwards: dict[type, Callable[..., torch.Tensor]] = {}
    try:
        from segment_anything.modeling.image_encoder import Attention as SamAttention

        forwards[SamAttention] = _sam_vit_attention
    except ImportError:
        pass
    try:
        from mobile_sam.modeling.tiny_vit_sam import Attention as TinyVitAttention

        forwards[TinyVitAttention] = _tiny_vit_attention
    except ImportError:
        pass
    return forwards


def use_sdpa(encoder: torch.nn.Module) -> Callable[[], None]:
    """Swap SDPA into ``encoder``'s attention modules (this instance only); returns the undo."""
    forwards = _attention_forwards()
    patched = [m for m in encoder.modules() if type(m) in forwards]
    for module in patched:
        module.forward = types.MethodType(forwards[type(module)], module)

    def undo() -> None:
        for module in patched:
            del module.forward

    return undo


def autocast(call: Callable[[torch.Tensor], Any], device: torch.device, dtype: torch.dtype) -> Callable[[torch.Tensor], Any]:
    def run(image: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=dtype):
            out = call(image)
        return pytree.tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out)

    return run


def compiled(encoder: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], Any]:
    return torch.compile(encoder, mode="max-autotune" if device.type == "cuda" else None, dynamic=False)
