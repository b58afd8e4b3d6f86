"""Tiled and pyramidal TIFF / OME-TIFF through tifffile's zarr store: only touched tiles are read.

A TIFF is a slide when its first series is one plane (no T, Z or other frame axis beyond
length 1; channels allowed) stored in tiles, or has pyramid levels (SubIFDs, or the reduced
pages tifffile groups as levels), and tifffile can decode its compression. Untiled single-level TIFFs stay ordinary images, refused
from their header when over ``limits.max_image_pixels``.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile
import zarr

from samwatch.errors import JobError
from samwatch.media.pixels import ChannelRule
from samwatch.media.slides.base import Level, SlideReader

if TYPE_CHECKING:
    from samwatch.media.limits import MediaLimits

_PLANE_AXES = frozenset("YXCS")
#: Decoded tiles a reader keeps (about 85 RGB tiles of 512 x 512).
TILE_CACHE_BYTES = 64 * 2**20
# Vendor flags tifffile sets on a file, in the order they are preferred as a name.
_VENDOR_FLAGS = ("ome", "svs", "ndpi", "scn", "qpi", "philips", "bif", "imagej")
# What tifffile, zarr and the codecs raise on bytes that do not decode (imagecodecs' errors
# are RuntimeErrors; zarr passes a codec's error through).
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError, struct.error, zlib.error,
                  tifffile.TiffFileError, ZeroDivisionError)  # tifffile, on a page 0 pixels high
_TIFF_MAGIC = frozenset({b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"})
_PHYSICAL_SIZE = re.compile(r'PhysicalSize([XY])="([0-9.eE+-]+)"')
_PHYSICAL_UNIT = re.compile(r'PhysicalSize([XY])Unit="([^"]+)"')
_MICRONS_PER_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def is_tiff_slide(path: Path) -> bool:
    """Whether ``path`` is a TIFF read lazily by :class:`TiffReader` (module docstring)."""
    try:
        with _quiet(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            one_plane = set(series.axes) <= _PLANE_AXES
            # Without the codec (imagecodecs not installed) tiles cannot be decoded one by one;
            # media then reads the file whole through Pillow, as any other TIFF.
            decodable = series.keyframe.compression in tifffile.TIFF.DECOMPRESSORS
            return one_plane and decodable and (len(series.levels) > 1 or series.keyframe.is_tiled)
    except (*_DECODE_ERRORS, KeyError):
        return False  # not a readable TIFF: media reports why, from its own reader


def check_tiff_complete(path: Path) -> None:
    """Refuse a TIFF-based slide that is not a TIFF (image_unreadable) or is cut short
    (slide_truncated); a TIFF tifffile cannot parse is left to the vendor reader."""
    try:
        with open(path, "rb") as stream:
            magic = stream.read(4)
    except PermissionError as exc:
        raise JobError("image_unreadable", f"'{path.name}' cannot be read (permission denied); make it "
                       "readable by the user samwatch runs as.", file=str(path)) from exc
    if magic not in _TIFF_MAGIC:
        raise JobError("image_unreadable", f"'{path.name}' is not a TIFF file, as a {path.suffix} slide must "
                       "be: it is damaged or misnamed; export or copy it again.", file=str(path))
    try:
        with _quiet(), tifffile.TiffFile(path) as tif:
            _check_complete(path, tif)
    except (*_DECODE_ERRORS, KeyError):
        return


class TiffReader(SlideReader):
    """A tiled or pyramidal TIFF, one zarr array per level; tiles are decoded on demand.

    Decoded tiles are kept, least recently used first out, up to ``TILE_CACHE_BYTES``: windows
    that overlap (a tiler's halo, prompts close together) decode their shared tiles once.
    """

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
        _check_complete(self.path, self._tif)
        shapes = [dict(zip(level.axes, level.shape)) for level in series.levels]
        width, height = shapes[0]["X"], shapes[0]["Y"]
        self.levels = tuple(
            Level(s["X"], s["Y"], (width / s["X"] + height / s["Y"]) / 2) for s in shapes)
        self.dtype = np.dtype(series.dtype)
        self.n_channels = int(np.prod([n for a, n in shapes[0].items() if a in "CS"]))
        self._arrays = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(shapes))]
        y_axis, x_axis = self._axes.index("Y"), self._axes.index("X")
        self._chunks = [(a.chunks[y_axis], a.chunks[x_axis]) for a in self._arrays]
        self._hwc_order = [y_axis, x_axis] + [i for i, a in enumerate(self._axes) if a in "CS"]
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        keyframe = series.keyframe
        self.tile_size = (keyframe.tilewidth, keyframe.tilelength) if keyframe.is_tiled else None
        self.vendor = next((flag for flag in _VENDOR_FLAGS if flag in self._tif.flags), "tiff")
        self.mpp = _ome_mpp(self._tif.ome_metadata) if self._tif.is_ome else None

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        chunk_h, chunk_w = self._chunks[level]
        out = np.empty((h, w, self.n_channels), self.dtype)
        for row in range(y // chunk_h, (y + h - 1) // chunk_h + 1):
            for col in range(x // chunk_w, (x + w - 1) // chunk_w + 1):
                tile = self._tile(level, row, col)
                top, left = row * chunk_h, col * chunk_w
                y0, y1 = max(y, top), min(y + h, top + tile.shape[0])
                x0, x1 = max(x, left), min(x + w, left + tile.shape[1])
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def _tile(self, level: int, row: int, col: int) -> np.ndarray:
        """One stored tile (or strip) as H x W x C, from the cache or decoded now."""
        key = (level, row, col)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        tile = self._decode_tile(level, row, col)
        with self._cache_lock:
            self._cache[key] = tile
            self._cached_bytes += tile.nbytes
            while self._cached_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _decode_tile(self, level: int, row: int, col: int) -> np.ndarray:
        chunk_h, chunk_w = self._chunks[level]
        rows, cols = slice(row * chunk_h, (row + 1) * chunk_h), slice(col * chunk_w, (col + 1) * chunk_w)
        index = tuple(rows if a == "Y" else cols if a == "X" else slice(None) for a in self._axes)
        try:
            with _quiet():
                data = np.asarray(self._arrays[level][index])
        except _DECODE_ERRORS as exc:
            raise JobError(
                "slide_tile_corrupt",
                f"Tile (row {row}, column {col}) of level {level} of '{self.path.name}' does not decode "
                f"({type(exc).__name__}: {exc}); the file is damaged: export or copy it again.",
                file=str(self.path), level=level, tile=[row, col]) from exc
        data = data.transpose(self._hwc_order)
        return data.reshape(data.shape[0], data.shape[1], -1)

    def close(self) -> None:
        self._tif.close()


def _check_complete(path: Path, tif: tifffile.TiffFile) -> None:
    """Refuse a file cut short: an IFD, or tile data of some level, would lie past its end.

    tifffile only warns when the IFD chain leads past the end, and drops the pages beyond, so
    the chain is walked here; NDPI's non-standard 64-bit offsets are left to tifffile.
    """
    size = tif.filehandle.size
    missing = None if tif.tiff.is_ndpi else _ifd_past_end(tif)
    if missing is not None:
        raise _truncated(path, f"an image directory at byte {missing:,}", size)
    # Main-chain pages hold the levels of SVS-like files, SubIFDs (in the levels) those of OME-TIFF.
    pages = [("page", i, page) for i, page in enumerate(tif.pages)]
    for _, _, page in pages:
        beyond = [offset for offset in getattr(page, "subifds", None) or () if offset >= size]
        if beyond:
            raise _truncated(path, f"a pyramid level (SubIFD) at byte {beyond[0]:,}", size)
    pages += [("level", i, page) for i, level in enumerate(tif.series[0].levels) for page in level.pages]
    for what, number, page in pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise _truncated(path, f"the pixels of {what} {number} up to byte {max(ends):,}", size)


def _ifd_past_end(tif: tifffile.TiffFile) -> int | None:
    """Offset of the first IFD of the main chain not wholly inside the file, None if none is."""
    fmt, fh = tif.tiff, tif.filehandle
    fh.seek(8 if fmt.is_bigtiff else 4)
    offset = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))[0]
    seen = set()
    while offset and offset not in seen:
        seen.add(offset)
        if offset + fmt.tagnosize > fh.size:
            return offset
        fh.seek(offset)
        count = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))[0]
        next_at = offset + fmt.tagnosize + count * fmt.tagsize
        if next_at + fmt.offsetsize > fh.size:
            return offset
        fh.seek(next_at)
        offset = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))[0]
    return None


def _truncated(path: Path, what: str, size: int) -> JobError:
    return JobError("slide_truncated", f"'{path.name}' is cut short: it needs {what}, but the file ends "
                    f"at {size:,} bytes; copy it again once it is fully written.", file=str(path))


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
def _quiet() -> Iterator[None]:
    """Hold back tifffile's own warnings about damaged files while parsing: what matters reaches
    the person as the job's error, and the log keeps one line per event."""
    tiff_logger = logging.getLogger("tifffile")
    level = tiff_logger.level
    tiff_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tiff_logger.setLevel(level)


@contextmanager
def _opening(path: Path) -> Iterator[None]:
    """A file that does not parse as a TIFF pyramid is unreadable, not a crash."""
    try:
        with _quiet():
            yield
    except FileNotFoundError as exc:
        raise JobError("image_not_found", f"'{path.name}' does not exist; check the name, or wait "
                       "until it has been copied in.", file=str(path)) from exc
    except (*_DECODE_ERRORS, KeyError) as exc:
        raise JobError("image_unreadable", f"'{path.name}' is not a readable tiled TIFF "
                       f"({type(exc).__name__}: {exc}); export or copy it again.", file=str(path)) from exc
