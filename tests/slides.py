"""Slides built in the tests with tifffile: pyramidal OME-TIFF, Aperio-style SVS, a 40 000-px slide.

A :class:`SparseSlide` is a background colour with image patches pasted on it; it writes
itself tile by tile (from an iterator, never as a whole array), and :meth:`SparseSlide.expected`
gives the pixels any region of any level must have, so readers are checked against the
truth without holding the slide. Level ``k`` is level 0 sampled every ``2**k`` pixels (no
smoothing: every level's pixel is a level-0 pixel, so expected values are exact).

Builders are fast: tiles that show only background are one precompressed tile written again.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
import skimage.transform
import tifffile

APERIO_DESCRIPTION = "Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) {codec} Q=90|AppMag = 40|MPP = 0.25"


@dataclass
class SparseSlide:
    width: int
    height: int
    background: tuple[int, ...] = (255, 255, 255)
    patches: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # (x, y, H x W x C)

    @property
    def channels(self) -> int:
        return len(self.background)

    @property
    def dtype(self) -> np.dtype:
        return self.patches[0][2].dtype if self.patches else np.dtype(np.uint8)

    def level_shape(self, level: int) -> tuple[int, int]:
        ds = 2**level
        return math.ceil(self.height / ds), math.ceil(self.width / ds)

    def expected(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Level pixels [y:y+h, x:x+w] of ``level``; zero outside the image."""
        ds = 2**level
        level_h, level_w = self.level_shape(level)
        out = np.zeros((h, w, self.channels), self.dtype)
        inside = out[max(0, -y) : max(0, min(h, level_h - y)), max(0, -x) : max(0, min(w, level_w - x))]
        inside[...] = self.background
        rows, cols = (np.arange(y, y + h) * ds), (np.arange(x, x + w) * ds)
        for px, py, patch in self.patches:
            r = np.nonzero((rows >= py) & (rows < py + patch.shape[0]) & (rows < self.height))[0]
            c = np.nonzero((cols >= px) & (cols < px + patch.shape[1]) & (cols < self.width))[0]
            if r.size and c.size:
                out[np.ix_(r, c)] = patch[np.ix_(rows[r] - py, cols[c] - px)]
        return out

    def full(self, level: int = 0) -> np.ndarray:
        h, w = self.level_shape(level)
        return self.expected(0, 0, w, h, level)

    def tiles(self, level: int, tile: int, encode, channel: int | None = None) -> Iterator[bytes]:
        """Encoded tiles of ``level`` in row-major order (of one ``channel`` when given, for planar
        files); background-only tiles are encoded once."""
        if channel is not None:
            plane = encode
            encode = lambda pixels: plane(pixels[..., channel])  # noqa: E731
        ds = 2**level
        level_h, level_w = self.level_shape(level)
        blank = None
        for ty in range(0, level_h, tile):
            for tx in range(0, level_w, tile):
                box = (tx * ds, ty * ds, (tx + tile) * ds, (ty + tile) * ds)
                edge = tx + tile > level_w or ty + tile > level_h
                if edge or any(_overlaps(box, p) for p in self.patches):
                    yield encode(self.expected(tx, ty, tile, tile, level))
                    continue
                if blank is None:
                    blank = encode(self.expected(tx, ty, tile, tile, level))
                yield blank


def _overlaps(box: tuple[int, int, int, int], patch: tuple[int, int, np.ndarray]) -> bool:
    px, py, array = patch
    return px < box[2] and box[0] < px + array.shape[1] and py < box[3] and box[1] < py + array.shape[0]


@functools.cache
def _pieces() -> tuple[np.ndarray, np.ndarray]:
    coffee = skimage.transform.resize(skimage.data.coffee(), (512, 512), preserve_range=True)
    return skimage.data.astronaut(), coffee.astype(np.uint8)


def skimage_content(height: int, width: int, pitch: int = 512) -> np.ndarray:
    """Real image content of any size: scikit-image's astronaut and coffee tiled, RGB uint8, a
    piece every ``pitch`` pixels (a tiling test keeps the pieces' straight edges off its seams)."""
    pieces = _pieces()
    if pitch != 512:
        pieces = tuple(skimage.transform.resize(p, (pitch, pitch), preserve_range=True).astype(np.uint8) for p in pieces)
    rows = []
    for i, y in enumerate(range(0, height, pitch)):
        row = [pieces[(i + j) % 2][:pitch, :pitch] for j, _ in enumerate(range(0, width, pitch))]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def dense_slide(height: int, width: int) -> SparseSlide:
    """A slide that is all content (skimage)."""
    return SparseSlide(width, height, patches=[(0, 0, skimage_content(height, width))])


def blank_slide(size: int = 40_000, n_patches: int = 4) -> SparseSlide:
    """A mostly white ``size`` x ``size`` slide with a few 1024-px skimage patches on it."""
    patches = [(int(size * f), int(size * f * 0.7), skimage_content(1024, 1024))
               for f in np.linspace(0.1, 0.8, n_patches)]
    return SparseSlide(size, size, patches=[(x - x % 64, y - y % 64, p) for x, y, p in patches])


def _zlib_encoder(level: int = 6):
    return lambda tile: zlib.compress(np.ascontiguousarray(tile).tobytes(), level)


def write_ome_pyramid(path: Path, slide: SparseSlide, *, levels: int = 3, tile: int = 512,
                      mpp: float = 0.5, planar: bool = False) -> Path:
    """Pyramidal OME-TIFF: level 0 with ``levels - 1`` SubIFDs, zlib tiles written from an iterator.

    RGB is stored interleaved (``YXS``); ``planar`` stores channels as pages (``CYX``), as
    fluorescence scanners do.
    """
    encode = _zlib_encoder()
    planar = planar or slide.channels not in (1, 3)
    axes = "CYX" if planar else "YXS" if slide.channels == 3 else "YX"
    options = dict(tile=(tile, tile), compression="zlib", dtype=slide.dtype,
                   photometric="minisblack" if planar or slide.channels == 1 else "rgb")
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for level in range(levels):
            plane = slide.level_shape(level)
            shape = (slide.channels, *plane) if planar else (*plane, 3) if slide.channels == 3 else plane
            tiles = (itertools.chain.from_iterable(slide.tiles(level, tile, encode, c) for c in range(slide.channels))
                     if planar else slide.tiles(level, tile, encode))
            extra = (dict(subifds=levels - 1, metadata={"axes": axes, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
                     if level == 0 else dict(subfiletype=1))
            tw.write(tiles, shape=shape, **options, **extra)
    return path


def write_svs(path: Path, slide: SparseSlide, *, levels: int = 3, tile: int = 256,
              compression: str = "zlib") -> Path:
    """Aperio-style SVS that OpenSlide opens: tiled level 0 with the Aperio description, then a
    stripped thumbnail, then the reduced levels (tiled), as Aperio scanners lay them out."""
    codec = "JPEG" if compression == "jpeg" else "Deflate"
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for level in range(levels):
            h, w = slide.level_shape(level)
            description = APERIO_DESCRIPTION.format(w=slide.width, h=slide.height, t=tile, codec=codec)
            if level:
                description += f" -> {w}x{h}"
            array_tiles = (slide.expected(tx, ty, tile, tile, level)
                           for ty in range(0, h, tile) for tx in range(0, w, tile))
            tw.write(array_tiles, shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression=compression, description=description, metadata=None,
                     subfiletype=0 if level == 0 else 1)
            if level == 0:
                thumb = slide.full(levels) if slide.width * slide.height <= 1 << 24 else slide.expected(0, 0, 256, 256, 6)
                tw.write(thumb, photometric="rgb", description=APERIO_DESCRIPTION.format(
                    w=slide.width, h=slide.height, t=tile, codec=codec), metadata=None)
    return path


def corrupt_tile(path: Path, tile: int = 3, page: int = 0) -> tuple[int, int]:
    """Overwrite bytes inside one tile of ``page`` so that it no longer decodes; its (row, col)."""
    with tifffile.TiffFile(path) as tif:
        target = tif.pages[page]
        offset, count = target.dataoffsets[tile], target.databytecounts[tile]
        per_row = math.ceil(target.imagewidth / target.tilewidth)
    with open(path, "r+b") as stream:
        stream.seek(offset + min(10, count // 2))
        stream.write(b"\xff" * min(200, count // 2))
    return divmod(tile, per_row)


def truncate(path: Path, fraction: float) -> Path:
    """Cut ``path`` to ``fraction`` of its size, as an interrupted copy leaves it."""
    with open(path, "r+b") as stream:
        stream.truncate(int(path.stat().st_size * fraction))
    return path
