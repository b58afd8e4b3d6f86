"""The model types samwatch knows, and which family (adapter) serves each."""

from __future__ import annotations

from typing import Literal

ModelType = Literal[
    "vit_h", "vit_l", "vit_b", "vit_t", "sam2_t", "sam2_s", "sam2_bp", "sam2_l", "sam3"
]

MODEL_TYPES: tuple[str, ...] = (
    "vit_h", "vit_l", "vit_b", "vit_t", "sam2_t", "sam2_s", "sam2_bp", "sam2_l", "sam3"
)

#: model type -> adapter family module under ``samwatch.models``
FAMILY_OF: dict[str, str] = {
    "vit_h": "sam1",
    "vit_l": "sam1",
    "vit_b": "sam1",
    "vit_t": "sam1",
    "sam2_t": "sam2",
    "sam2_s": "sam2",
    "sam2_bp": "sam2",
    "sam2_l": "sam2",
    "sam3": "sam3",
}

#: The official checkpoints samapi registers as ``default`` for each type.
DEFAULT_WEIGHT_URLS: dict[str, str] = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_t": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
    "sam2_l": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt",
    "sam2_bp": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt",
    "sam2_s": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_small.pt",
    "sam2_t": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_tiny.pt",
    "sam3": "hf://facebook/sam3/sam3.pt",
}
