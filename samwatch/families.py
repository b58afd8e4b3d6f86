"""The model families samwatch knows: one row each, the single source of every per-family fact.

The type list (and the ``ModelType`` schema literal), which adapter module serves a type, which
kinds of job (modes) it can do, the advice given when a sidecar asks a family for a mode it
lacks, and the registry's built-in ``default`` weights all derive from :data:`FAMILIES`. Adding
a family is one adapter module under ``samwatch.models`` plus one row here. Nothing here imports
torch, so the config schema and ``samwatch check`` stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["prompts", "automask", "text", "video"]

_META = "https://dl.fbaipublicfiles.com"


@dataclass(frozen=True)
class Family:
    title: str  # what a person calls it (README, messages)
    module: str  # adapter module under samwatch.models, defining ``Adapter``
    package: str  # the upstream Python package the adapter imports
    modes: frozenset[str]
    #: model type -> the official checkpoint samapi registers as ``default`` for it
    default_urls: dict[str, str]


FAMILIES: tuple[Family, ...] = (
    Family(
        "SAM", "sam1", "segment_anything", frozenset({"prompts", "automask"}),
        {
            "vit_h": f"{_META}/segment_anything/sam_vit_h_4b8939.pth",
            "vit_l": f"{_META}/segment_anything/sam_vit_l_0b3195.pth",
            "vit_b": f"{_META}/segment_anything/sam_vit_b_01ec64.pth",
        },
    ),
    Family(
        "MobileSAM", "sam1", "mobile_sam", frozenset({"prompts", "automask"}),
        {"vit_t": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"},
    ),
    Family(
        "SAM2", "sam2", "sam2", frozenset({"prompts", "automask", "video"}),
        {
            "sam2_t": f"{_META}/segment_anything_2/072824/sam2_hiera_tiny.pt",
            "sam2_s": f"{_META}/segment_anything_2/072824/sam2_hiera_small.pt",
            "sam2_bp": f"{_META}/segment_anything_2/072824/sam2_hiera_base_plus.pt",
            "sam2_l": f"{_META}/segment_anything_2/072824/sam2_hiera_large.pt",
        },
    ),
    Family("SAM3", "sam3", "sam3", frozenset({"text", "video"}), {"sam3": "hf://facebook/sam3/sam3.pt"}),
)

FAMILY_OF: dict[str, Family] = {t: family for family in FAMILIES for t in family.default_urls}
MODEL_TYPES: tuple[str, ...] = tuple(FAMILY_OF)
DEFAULT_WEIGHT_URLS: dict[str, str] = {t: url for family in FAMILIES for t, url in family.default_urls.items()}

ModelType = Literal[MODEL_TYPES]  # type: ignore[valid-type]  # built from the table on purpose

_MODE_WORDS = {
    "prompts": "box and point prompts",
    "automask": "automatic masks (a sidecar without prompts)",
    "text": "text and exemplar-box prompts",
    "video": "tracking through frames",
}


def modes_of(model_type: str) -> frozenset[str]:
    return FAMILY_OF[model_type].modes


def mode_advice(mode: str) -> str:
    """Which types can do ``mode``: the hint given when a sidecar's model cannot."""
    types = [t for t in MODEL_TYPES if mode in FAMILY_OF[t].modes]
    return f"for {_MODE_WORDS.get(mode, mode)}, use model: {' | '.join(types)}."
