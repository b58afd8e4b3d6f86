"""An ordinary image, already decoded to RGB uint8, behind the region API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samwatch.media.pixels import ChannelRule
from samwatch.media.slides.base import Level, SlideReader

if TYPE_CHECKING:
    from samwatch.media.limits import MediaLimits


class ArraySource(SlideReader):
    """One level: the whole RGB uint8 image in memory (decoded once, under max_image_pixels)."""

    kind = "array"

    def __init__(self, path: Path, rgb: np.ndarray, limits: MediaLimits) -> None:
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"ArraySource takes RGB uint8 H x W x 3, got {rgb.dtype} {rgb.shape}")
        # The channel rule was applied when the image was decoded; regions are served as they are.
        super().__init__(limits, ChannelRule())
        self.path = Path(path)
        self._rgb = rgb
        self.levels = (Level(rgb.shape[1], rgb.shape[0], 1.0),)
        self.dtype = np.dtype(np.uint8)
        self.n_channels = 3

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w]

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        return raw
