"""What every region reader shares: levels, the region geometry, limits and the channel rule.

Coordinates
-----------
``x, y, w, h`` are always level-0 (full-resolution) pixels. A read at ``level`` with
downsample ``ds`` returns ``ceil(h / ds) x ceil(w / ds)`` pixels whose pixel ``[0, 0]`` is
level pixel ``(floor(x / ds), floor(y / ds))``; :meth:`SlideReader.level_origin` gives where
that pixel starts in level-0 pixels (``Detection.origin``; ``Detection.scale`` is ``ds``).
Windows whose corner is a multiple of ``ds`` land exactly. Pixels outside the image are
zero, so a window at the border keeps its size.

Limits
------
``limits.max_image_pixels`` bounds each read (what one window decodes at once, at its
level); ``limits.max_slide_pixels`` bounds the level-0 size of a slide, checked when it is
opened, from its header.

Channels and bit depth
----------------------
Regions go through :func:`samwatch.media.pixels.to_rgb8` with the job's ``ChannelRule``. A
percentile stretch computed per window would make neighbouring tiles differ in brightness,
so a slide that needs one (non-uint8 data, or ``normalize`` other than auto/none) gets its
bounds once, from its coarsest level: that level whole when it has at most
``_BOUNDS_LEVEL_PIXELS`` pixels, else a 4 x 4 grid of 512-px windows spread over it. Every
region of the slide then uses those bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from samwatch.errors import JobError
from samwatch.media.pixels import (
    Bounds, ChannelRule, check_channels, needs_stretch, select_channels, stretch_bounds, to_rgb8,
)

if TYPE_CHECKING:
    from samwatch.media.limits import MediaLimits

_BOUNDS_LEVEL_PIXELS = 4096 * 4096
_BOUNDS_GRID = 4
_BOUNDS_WINDOW = 512


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in its own pixels, and how many level-0 pixels one covers."""

    width: int
    height: int
    downsample: float


class RegionSource(Protocol):
    """A lazily read image: what the tiler codes against (see the module docstring).

    ``levels[0]`` is full resolution, coarser levels follow. ``kind`` names the reader for
    provenance ("array", "tiff", "openslide"). Use as a context manager, or call ``close``.
    """

    path: Path
    width: int
    height: int
    levels: tuple[Level, ...]
    kind: str

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray: ...

    def read_raw(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray: ...

    def check_level(self, level: int) -> None: ...

    def best_level(self, downsample: float) -> int: ...

    def level_origin(self, x: int, y: int, level: int) -> tuple[float, float]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def __enter__(self) -> RegionSource: ...

    def __exit__(self, *exc: object) -> None: ...


class SlideReader:
    """The shared half of every reader; a subclass supplies ``_read_level`` and its metadata.

    Subclasses set ``path``, ``kind``, ``levels``, ``dtype`` (of the stored pixels),
    ``n_channels``, and optionally ``vendor``, ``mpp`` (µm per level-0 pixel, x and y) and
    ``tile_size`` (the stored tile width and height at level 0).
    """

    path: Path
    kind: str
    levels: tuple[Level, ...]
    dtype: np.dtype
    n_channels: int
    vendor: str | None = None
    mpp: tuple[float, float] | None = None
    tile_size: tuple[int, int] | None = None

    def __init__(self, limits: MediaLimits, rule: ChannelRule) -> None:
        self.limits = limits
        self.rule = rule

    # -- what subclasses provide

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Stored pixels ``[y:y+h, x:x+w]`` of ``level`` (all inside it) as H x W x C."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; the reader cannot be used afterwards."""

    # -- the public reading API

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """RGB uint8 ``ceil(h/ds) x ceil(w/ds) x 3`` of the level-0 box at ``level``."""
        return self._convert(self.read_raw(x, y, w, h, level=level))

    def read_raw(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """As :meth:`read_region`, but the stored dtype and channels, before the channel rule."""
        self.check_level(level)
        if w <= 0 or h <= 0:
            raise ValueError(f"a region needs a positive size, got {w}x{h}")
        info = self.levels[level]
        left, top = self._level_corner(x, y, level)
        out_w, out_h = math.ceil(w / info.downsample), math.ceil(h / info.downsample)
        self._check_decode(out_w, out_h, level)
        out = np.zeros((out_h, out_w, self.n_channels), self.dtype)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + out_w, info.width), min(top + out_h, info.height)
        if x1 > x0 and y1 > y0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (0 when none is)."""
        fits = [i for i, info in enumerate(self.levels) if info.downsample <= downsample * (1 + 1e-6)]
        return max(fits, key=lambda i: self.levels[i].downsample) if fits else 0

    def level_origin(self, x: int, y: int, level: int) -> tuple[float, float]:
        """Level-0 position of pixel [0, 0] of ``read_region(x, y, ..., level=level)``."""
        self.check_level(level)
        left, top = self._level_corner(x, y, level)
        ds = self.levels[level].downsample
        return left * ds, top * ds

    def check_level(self, level: int) -> None:
        """Refuse a level the file does not have, with the levels it has."""
        if not 0 <= level < len(self.levels):
            sizes = ", ".join(f"{i}: {lv.width}x{lv.height}" for i, lv in enumerate(self.levels))
            raise JobError(
                "slide_level_missing",
                f"Level {level} was asked for but '{self.path.name}' has {len(self.levels)} "
                f"level(s) ({sizes}); pick one of 0 to {len(self.levels) - 1}, or give a downsample.",
                field="tiling.level", file=str(self.path))

    def describe(self) -> dict[str, Any]:
        """Slide metadata for provenance: reader, vendor, levels, µm per pixel, tile size."""
        return {
            "reader": self.kind,
            "vendor": self.vendor,
            "levels": [[lv.width, lv.height, round(lv.downsample, 6)] for lv in self.levels],
            "mpp": list(self.mpp) if self.mpp else None,
            "tile_size": list(self.tile_size) if self.tile_size else None,
            "dtype": str(self.dtype),
            "channels": self.n_channels,
        }

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared checks and conversion

    def _check_slide_size(self) -> None:
        """Called by subclasses once their levels are known, before any pixel is read."""
        pixels = self.width * self.height
        if pixels > self.limits.max_slide_pixels:
            raise JobError(
                "slide_too_large",
                f"'{self.path.name}' is {self.width}x{self.height} = {pixels:,} pixels, over "
                f"limits.max_slide_pixels ({self.limits.max_slide_pixels:,}); raise the limit in "
                "the config if you trust the file.", file=str(self.path))
        check_channels(self.rule.channels, self.n_channels, self.path)

    def _check_decode(self, w: int, h: int, level: int) -> None:
        if w * h > self.limits.max_image_pixels:
            raise JobError(
                "image_too_large",
                f"A {w}x{h} read of level {level} of '{self.path.name}' is {w * h:,} pixels, over "
                f"limits.max_image_pixels ({self.limits.max_image_pixels:,}); use smaller tiles or a "
                "coarser level, or raise the limit in the config.", file=str(self.path))

    def _level_corner(self, x: int, y: int, level: int) -> tuple[int, int]:
        ds = self.levels[level].downsample
        return math.floor(x / ds + 1e-9), math.floor(y / ds + 1e-9)

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        return to_rgb8(raw, self.rule, channel_axis=-1, bounds=self._bounds)

    @cached_property
    def _bounds(self) -> Bounds | None:
        if not needs_stretch(self.dtype, self.rule):
            return None
        level = len(self.levels) - 1
        info = self.levels[level]
        if info.width * info.height <= min(_BOUNDS_LEVEL_PIXELS, self.limits.max_image_pixels):
            boxes = [(0, 0, info.width, info.height)]
        else:
            w, h = min(_BOUNDS_WINDOW, info.width), min(_BOUNDS_WINDOW, info.height)
            xs = np.linspace(0, info.width - w, _BOUNDS_GRID).astype(int)
            ys = np.linspace(0, info.height - h, _BOUNDS_GRID).astype(int)
            boxes = [(int(x), int(y), w, h) for y in ys for x in xs]
        samples = [select_channels(self._read_level(level, x, y, w, h), self.rule.channels)
                   for x, y, w, h in boxes]
        return stretch_bounds(samples, self.rule)
