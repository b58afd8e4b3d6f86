"""Tiled and pyramidal TIFF / OME-TIFF through tifffile's zarr store: only touched tiles are read.

A TIFF is a slide when its first series is one plane (no T, Z or other frame axis beyond
length 1; channels allowed) stored in tiles, or has pyramid levels (SubIFDs, or the reduced
pages tifffile groups as levels). Untiled single-level TIFFs stay ordinary images, refused
from their header when over ``limits.max_image_pixels``.
"""

from __future__ import annotations

import re
import struct
import zlib
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
import zarr

from samwatch.errors import JobError
from samwatch.pixels import ChannelRule
from samwatch.slides.base import Level, SlideReader

if TYPE_CHECKING:
    from samwatch.media import MediaLimits

_PLANE_AXES = frozenset("YXCS")
# Vendor flags tifffile sets on a file, in the order they are preferred as a name.
_VENDOR_FLAGS = ("ome", "svs", "ndpi", "scn", "qpi", "philips", "bif", "imagej")
# What tifffile, zarr and the codecs raise on bytes that do not decode (imagecodecs' errors
# are RuntimeErrors; zarr passes a codec's error through).
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError, struct.error, zlib.error,
                  tifffile.TiffFileError)
_PHYSICAL_SIZE = re.compile(r'PhysicalSize([XY])="([0-9.eE+-]+)"')
_PHYSICAL_UNIT = re.compile(r'PhysicalSize([XY])Unit="([^"]+)"')
_MICRONS_PER_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_tiff_slide(path: Path) -> bool:
    """Whether ``path`` is a TIFF read lazily by :class:`TiffReader` (module docstring)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            one_plane = set(series.axes) <= _PLANE_AXES
            return one_plane and (len(series.levels) > 1 or series.keyframe.is_tiled)
    except (*_DECODE_ERRORS, KeyError):
        return False  # not a readable TIFF: media reports why, from its own reader


class TiffReader(SlideReader):
    """A tiled or pyramidal TIFF, one zarr array per level; tiles are decoded on demand."""

    kind = "tiff"

    def __init__(self, path: Path, limits: MediaLimits, rule: ChannelRule) -> None:
        super().__init__(limits, rule)
        self.path = Path(path)
        with _opening(self.path):
            self._tif = tifffile.TiffFile(self.path)
        try:
            with _opening(self.path):
                self._open_levels()
            self._check_slide_size()
        except BaseException:
            self._tif.close()
            raise

    def _open_levels(self) -> None:
        series = self._tif.series[0]
        if not set(series.axes) <= _PLANE_AXES:
            raise JobError("slide_format_unsupported", f"'{self.path.name}' holds more than one plane "
                           f"(axes {series.axes}); a slide must be a single plane, so save one "
                           "plane per file.", file=str(self.path))
        self._axes = series.axes
        _check_complete(self.path, series.levels)
        shapes = [dict(zip(level.axes, level.shape)) for level in series.levels]
        width, height = shapes[0]["X"], shapes[0]["Y"]
        self.levels = tuple(
            Level(s["X"], s["Y"], (width / s["X"] + height / s["Y"]) / 2) for s in shapes)
        self.dtype = np.dtype(series.dtype)
        self.n_channels = int(np.prod([n for a, n in shapes[0].items() if a in "CS"]))
        self._arrays = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(shapes))]
        keyframe = series.keyframe
        self.tile_size = (keyframe.tilewidth, keyframe.tilelength) if keyframe.is_tiled else None
        self.vendor = next((flag for flag in _VENDOR_FLAGS if flag in self._tif.flags), "tiff")
        self.mpp = _ome_mpp(self._tif.ome_metadata) if self._tif.is_ome else None

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        index = tuple(slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None)
                      for a in self._axes)
        try:
            data = np.asarray(self._arrays[level][index])
        except _DECODE_ERRORS as exc:
            raise JobError(
                "slide_tile_corrupt",
                f"A tile of level {level} of '{self.path.name}' inside the region x={x}, y={y}, "
                f"{w}x{h} (level pixels) does not decode ({type(exc).__name__}: {exc}); the file is "
                "damaged: export or copy it again.", file=str(self.path)) from exc
        order = [self._axes.index("Y"), self._axes.index("X")] + [i for i, a in enumerate(self._axes) if a in "CS"]
        data = data.transpose(order)
        return data.reshape(data.shape[0], data.shape[1], -1)

    def close(self) -> None:
        self._tif.close()


def _check_complete(path: Path, levels: list[Any]) -> None:
    """Refuse a file cut short: tile data of some level would lie past its end."""
    size = path.stat().st_size
    for number, level in enumerate(levels):
        for page in level.pages:
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise JobError(
                    "slide_truncated",
                    f"'{path.name}' is cut short: level {number} of its pyramid needs "
                    f"{max(ends):,} bytes but the file has {size:,}; copy it again once it is "
                    "fully written.", file=str(path), level=number)


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    sizes = dict(_PHYSICAL_SIZE.findall(xml or ""))
    if "X" not in sizes or "Y" not in sizes:
        return None
    units = dict(_PHYSICAL_UNIT.findall(xml or ""))
    factors = [_MICRONS_PER_UNIT.get(units.get(axis, "µm")) for axis in "XY"]
    if None in factors:
        return None
    return float(sizes["X"]) * factors[0], float(sizes["Y"]) * factors[1]


@contextmanager
def _opening(path: Path) -> Iterator[None]:
    """A file that does not parse as a TIFF pyramid is unreadable, not a crash."""
    try:
        yield
    except FileNotFoundError as exc:
        raise JobError("image_not_found", f"'{path.name}' does not exist; check the name, or wait "
                       "until it has been copied in.", file=str(path)) from exc
    except (*_DECODE_ERRORS, KeyError) as exc:
        raise JobError("image_unreadable", f"'{path.name}' is not a readable tiled TIFF "
                       f"({type(exc).__name__}: {exc}); export or copy it again.", file=str(path)) from exc
