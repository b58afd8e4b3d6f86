"""Mask prompts: a PNG next to the sidecar, or samapi's base64 ``b64mask``, as SAM logits.

SAM's ``mask_input`` is a 256×256 low-resolution logit map of the image resized so its longest
side is 256 (then padded right/bottom). A mask may be given at that size (as samapi passes
it through) or at the image's full size, which samwatch resizes the same way. Nonzero pixels
become logit +10, zero pixels -10: firmly in / out, as a previous prediction would be.
"""

from __future__ import annotations

import base64
import binascii
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from samwatch.control.discovery import resolve_inside, split_name
from samwatch.errors import JobError
from samwatch.sidecars.schema import Prompt

LOW_RES = 256
LOGIT = 10.0


def _decode(
    source: Path | io.BytesIO, image_hw: tuple[int, int], *, where: str, field: str, sidecar: str
) -> np.ndarray:
    """The mask's pixels, its size checked from the header first: a huge or sparse file is
    refused before a byte of pixels is decoded (or read)."""
    height, width = image_hw
    try:
        with Image.open(source) as image:
            if image.size not in ((LOW_RES, LOW_RES), (width, height)):
                raise JobError(
                    "mask_invalid",
                    f"The mask {where} is {image.size[0]}×{image.size[1]} pixels; it must be the image's size "
                    f"({width}×{height}) or SAM's low-res size ({LOW_RES}×{LOW_RES}).",
                    file=sidecar, field=field,
                )
            array = np.asarray(image.convert("L") if image.mode not in ("L", "1", "I;16", "I") else image)
    except Image.DecompressionBombError as exc:
        raise JobError(
            "mask_invalid",
            f"The mask {where} is far larger than the image ({exc}); save it at the image's size "
            f"({width}×{height}) or at {LOW_RES}×{LOW_RES}.",
            file=sidecar, field=field,
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zlib.error) as exc:
        raise JobError(
            "mask_invalid", f"The mask {where} cannot be read as an image ({exc}); save it as a PNG.",
            file=sidecar, field=field,
        ) from None
    return array


def to_low_res_logits(mask: np.ndarray, image_hw: tuple[int, int], *, where: str, field: str, sidecar: str) -> np.ndarray:
    height, width = image_hw
    if mask.ndim != 2:
        raise JobError("mask_invalid", f"The mask {where} must be a single-channel image.", file=sidecar, field=field)
    binary = mask > 0
    if binary.shape == (LOW_RES, LOW_RES):
        low = binary
    elif binary.shape == (height, width):
        scale = LOW_RES / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((new_w, new_h), Image.NEAREST)
        low = np.zeros((LOW_RES, LOW_RES), dtype=bool)
        low[:new_h, :new_w] = np.asarray(resized) > 0
    else:
        raise JobError(
            "mask_invalid",
            f"The mask {where} is {binary.shape[1]}×{binary.shape[0]} pixels; it must be the image's size "
            f"({width}×{height}) or SAM's low-res size ({LOW_RES}×{LOW_RES}).",
            file=sidecar, field=field,
        )
    return np.where(low, LOGIT, -LOGIT).astype(np.float32)


def prompt_masks(
    prompts: list[Prompt], *, inbox: Path, sidecar_rel: str, image_hw: tuple[int, int]
) -> list[np.ndarray | None]:
    """Low-res logits for each prompt's mask (None where it has none)."""
    folder = split_name(sidecar_rel)[0]
    result: list[np.ndarray | None] = []
    for index, prompt in enumerate(prompts):
        if prompt.mask is not None:
            field = f"prompts.{index}.mask"
            rel = resolve_inside(inbox, folder, prompt.mask, field=field, sidecar=sidecar_rel)
            path = inbox / rel
            if not path.is_file():
                raise JobError("mask_invalid", f"The mask file {prompt.mask!r} does not exist next to the sidecar.",
                               file=sidecar_rel, field=field)
            array = _decode(path, image_hw, where=repr(prompt.mask), field=field, sidecar=sidecar_rel)
            result.append(to_low_res_logits(array, image_hw, where=repr(prompt.mask), field=field, sidecar=sidecar_rel))
        elif prompt.b64mask is not None:
            field = f"prompts.{index}.b64mask"
            try:
                data = base64.b64decode(prompt.b64mask, validate=True)
            except (binascii.Error, ValueError):
                raise JobError("mask_invalid", "b64mask is not valid base64; encode a PNG.", file=sidecar_rel, field=field) from None
            array = _decode(io.BytesIO(data), image_hw, where="b64mask", field=field, sidecar=sidecar_rel)
            result.append(to_low_res_logits(array, image_hw, where="b64mask", field=field, sidecar=sidecar_rel))
        else:
            result.append(None)
    return result
