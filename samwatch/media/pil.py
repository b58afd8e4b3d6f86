"""Pillow: PNG, JPEG, BMP, GIF (first frame of a still, every frame of a GIF), and mask prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from samwatch.errors import JobError
from samwatch.media.limits import MediaLimits, check_pixels
from samwatch.media.source import DECODE_ERRORS, Opened, reading

# Pillow modes whose arrays are usable as they are; every other mode (palette, LA, CMYK,
# YCbCr, ...) is converted to RGB, since Pillow knows what colours those encode.
_PIL_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PIL_NATIVE_MODES = frozenset({"1", "L", "I", "F", "RGB", "RGBA"}) | _PIL_16BIT_MODES
_PIL_DTYPES = {"1": "bool", "I": "int32", "F": "float32"} | dict.fromkeys(_PIL_16BIT_MODES,
                                                                          "uint16")
_PIL_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
_MASK_DIRECT_MODES = frozenset({"1", "L", "P", "I", "F", "RGB"}) | _PIL_16BIT_MODES


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask prompt image as float32 ``shape`` (H, W): 1 where any colour band is nonzero.

    A palette image counts by palette index; alpha is ignored.
    """
    path = Path(path)
    height, width = shape
    if not path.is_file():
        raise JobError("mask_invalid", f"The mask '{path.name}' does not exist; put it next to "
                       "the image or fix its name in the sidecar.", file=str(path))
    try:
        with Image.open(path) as im:
            if im.size != (width, height):
                raise JobError(
                    "mask_invalid",
                    f"The mask '{path.name}' is {im.size[0]}x{im.size[1]} pixels but the image "
                    f"is {width}x{height}; save the mask at the image's size.",
                    file=str(path))
            values = _mask_values(im)
    except (Image.DecompressionBombError, *DECODE_ERRORS) as exc:
        raise JobError("mask_invalid", f"The mask '{path.name}' could not be read ({exc}); save "
                       "it again as a PNG.", file=str(path)) from exc
    return values.reshape(height, width, -1).any(axis=-1).astype(np.float32)


@contextmanager
def pil_open(path: Path) -> Iterator[Image.Image]:
    # Pillow's own guard fires inside Image.open, before ours can look at the size.
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise JobError("image_too_large", f"'{path.name}' has more pixels than Pillow's "
                       f"decompression-bomb guard allows ({exc}); downscale or tile it.",
                       file=str(path)) from exc
    with im:
        yield im


def _pil_array(im: Image.Image) -> np.ndarray:
    if im.mode not in _PIL_NATIVE_MODES:
        im = im.convert("RGB")
    array = np.asarray(im)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array.reshape(array.shape[0], array.shape[1], -1)


def _pil_channels(mode: str) -> int:
    if mode == "RGBA":
        return 4
    if mode in _PIL_NATIVE_MODES and mode != "RGB":
        return 1
    return 3  # RGB, or a mode _pil_array converts to RGB


@dataclass(frozen=True)
class _PilSource:
    path: Path

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        with reading(self.path), pil_open(self.path) as im:
            for index in indices:
                im.seek(index)
                yield _pil_array(im)


def open_pil(path: Path, limits: MediaLimits, *, animated: bool) -> Opened:
    with reading(path), pil_open(path) as im:
        width, height = im.size
        check_pixels(path, width, height, limits)
        n_frames = getattr(im, "n_frames", 1) if animated else 1
        mode = im.mode
    n_channels = _pil_channels(mode)
    axes = ("T" if n_frames > 1 else "") + ("YX" if n_channels == 1 else "YXS")
    return Opened(_PilSource(path), width, height, n_frames, n_channels, axes,
                   _PIL_DTYPES.get(mode, "uint8"))


def _mask_values(im: Image.Image) -> np.ndarray:
    if im.mode in _PIL_ALPHA_MODES:
        return np.asarray(im)[..., :-1]
    if im.mode in _MASK_DIRECT_MODES:
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))

