"""``img001.labels.tif`` and ``img001.labels.csv``: the result as an instance label image.

Each feature's pixels (its polygons filled by pixel centres, exactly as
:func:`samwatch.geometry.raster.rasterize` does) take the value ``object_idx + 1``; 0 is background.
Where features overlap, the one with the higher quality wins, and among equal quality the
later one (see :func:`samwatch.outputs.shapes.painting_order`). The image has the input's
width, height and planes (``YX``, or ``TYX``/``ZYX`` for stacks and videos), is uint16
(uint32 when a label exceeds 65535), and is an OME-TIFF of 256 x 256 tiles rasterised one at
a time from the polygons, so memory stays bounded for slides. Images larger than
``PYRAMID_ABOVE`` a side also get sub-resolution levels (SubIFDs, each half the one above,
sampled the same way) down to at most ``PYRAMID_MIN`` a side.
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import tifffile

from samwatch.geometry.raster import rasterize_edges
from samwatch.outputs.shapes import Shape, painting_order

TILE = 256
PYRAMID_ABOVE = 4096
PYRAMID_MIN = 1024
_BIGTIFF_ABOVE = 2**31  # raw bytes; classic TIFF offsets end at 4 GiB, compressed or not
_ZLIB_LEVEL = 1  # label tiles are runs of few values: level 1 compresses them nearly as well


def label_dtype(shapes: Sequence[Shape]) -> np.dtype:
    top = max((shape.label for shape in shapes), default=0)
    return np.dtype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32).newbyteorder("<")


def pyramid_factors(width: int, height: int) -> list[int]:
    factors = [1]
    if max(width, height) > PYRAMID_ABOVE:
        while max(width, height) / factors[-1] > PYRAMID_MIN:
            factors.append(factors[-1] * 2)
    return factors


def _buckets(shapes: Sequence[Shape], factor: int) -> dict[tuple[int, int, int], list[Shape]]:
    """(plane, tile row, tile column) -> the shapes touching that tile, in painting order."""
    span = TILE * factor
    buckets: dict[tuple[int, int, int], list[Shape]] = defaultdict(list)
    for shape in painting_order(shapes):
        x0, y0, x1, y1 = shape.box
        for row in range(max(0, int(y0 // span)), int(math.ceil(y1 / span))):
            for column in range(max(0, int(x0 // span)), int(math.ceil(x1 / span))):
                buckets[(shape.plane, row, column)].append(shape)
    return buckets


def _paint(tile: np.ndarray, shape: Shape, x0: float, y0: float, factor: int) -> None:
    """Fill ``shape`` into ``tile``, whose pixel (0, 0) starts at image point (x0, y0)."""
    # Only the part of the tile under the shape's box is rasterised.
    c0 = max(0, int((shape.box[0] - x0) // factor))
    r0 = max(0, int((shape.box[1] - y0) // factor))
    c1 = min(TILE, int(math.ceil((shape.box[2] - x0) / factor)))
    r1 = min(TILE, int(math.ceil((shape.box[3] - y0) / factor)))
    if c1 <= c0 or r1 <= r0:
        return
    inside = rasterize_edges(
        *shape.edges, (r1 - r0, c1 - c0), origin=(x0 + c0 * factor, y0 + r0 * factor), scale=factor
    )
    tile[r0:r1, c0:c1][inside] = shape.label


def _encode(tile: np.ndarray) -> bytes:
    return zlib.compress(tile.tobytes(), _ZLIB_LEVEL)


def _tiles(
    shapes: Sequence[Shape], n_planes: int, width: int, height: int, factor: int, dtype: np.dtype
) -> Iterator[bytes]:
    """The zlib-compressed tiles of one level in TIFF order (plane, tile row, tile column).

    A slide's label image is mostly background: its empty tile is compressed once.
    """
    buckets = _buckets(shapes, factor)
    rows = math.ceil(math.ceil(height / factor) / TILE)
    columns = math.ceil(math.ceil(width / factor) / TILE)
    empty = _encode(np.zeros((TILE, TILE), dtype))
    for plane in range(n_planes):
        for row in range(rows):
            for column in range(columns):
                inside = buckets.get((plane, row, column))
                if not inside:
                    yield empty
                    continue
                tile = np.zeros((TILE, TILE), dtype)
                for shape in inside:
                    _paint(tile, shape, column * TILE * factor, row * TILE * factor, factor)
                yield _encode(tile)


def write_labels(
    handle: BinaryIO, shapes: Sequence[Shape], *, width: int, height: int, n_planes: int = 1, plane_axis: str = "T"
) -> None:
    """Write the label OME-TIFF of ``shapes`` to ``handle`` (seekable, binary)."""
    dtype = label_dtype(shapes)
    factors = pyramid_factors(width, height)
    axes = "YX" if n_planes == 1 else f"{plane_axis}YX"
    big = n_planes * width * height * dtype.itemsize > _BIGTIFF_ABOVE
    with tifffile.TiffWriter(handle, ome=True, bigtiff=big, byteorder="<") as tif:
        for level, factor in enumerate(factors):
            plane_shape = (math.ceil(height / factor), math.ceil(width / factor))
            tif.write(
                _tiles(shapes, n_planes, width, height, factor, dtype),
                shape=plane_shape if n_planes == 1 else (n_planes, *plane_shape),
                dtype=dtype,
                tile=(TILE, TILE),
                compression="zlib",
                subifds=len(factors) - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                metadata={"axes": axes} if level == 0 else None,
            )


def labels_csv(shapes: Sequence[Shape], describe_prompt: Callable[[int | None], str]) -> bytes:
    """One row per label value: its class, best score, prompt, and how many planes it is on."""
    rows: dict[int, dict[str, object]] = {}
    for shape in shapes:
        row = rows.get(shape.label)
        if row is None:
            rows[shape.label] = {
                "label": shape.label, "class": shape.name or "object", "score": shape.quality,
                "prompt_idx": "" if shape.prompt_idx is None else shape.prompt_idx,
                "prompt": describe_prompt(shape.prompt_idx), "planes": {shape.plane},
            }
        else:
            row["score"] = max(float(row["score"]), shape.quality)
            row["planes"].add(shape.plane)  # type: ignore[attr-defined]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", "class", "score", "prompt_idx", "prompt", "planes"])
    for label in sorted(rows):
        row = rows[label]
        writer.writerow([
            row["label"], row["class"], f"{float(row['score']):.4f}", row["prompt_idx"], row["prompt"],
            len(row["planes"]),  # type: ignore[arg-type]
        ])
    return out.getvalue().encode("utf-8")
