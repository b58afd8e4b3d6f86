"""Checks of a tiled result: edges that run along window borders or core seams, and duplicates.

Objects are level-0 masks cropped to their box: ``Crop(mask, x, y)``, from a GeoJSON feature
(:func:`crops_of`) or a detection (:func:`crop_of_detection`, resampled to level 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from samwatch.geometry.raster import polygons_of, rasterize_edges, ring_edges

MIN_RUN = 20  # pixels: the tiling bar's "straight edge along a seam"


@dataclass(frozen=True)
class Crop:
    mask: np.ndarray
    x: int
    y: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.mask.shape[1], self.y + self.mask.shape[0]


def crops_of(features: Iterable[dict]) -> list[Crop]:
    """Each feature rasterised into its own bounding box."""
    crops = []
    for feature in features:
        rings = [np.asarray(ring, np.float64) for rings in polygons_of(feature["geometry"]) for ring in rings]
        points = np.concatenate(rings)
        x0, y0 = np.floor(points.min(axis=0)).astype(int)
        x1, y1 = np.ceil(points.max(axis=0)).astype(int)
        mask = rasterize_edges(*ring_edges(rings), (y1 - y0, x1 - x0), origin=(x0, y0))
        crops.append(Crop(mask, int(x0), int(y0)))
    return crops


def crop_of_detection(detection) -> Crop:  # noqa: ANN001
    """A placed detection in level-0 pixels (a coarser mask repeated to full resolution)."""
    mask, scale = detection.mask, detection.scale
    x, y = detection.origin
    if scale != 1:  # level-0 pixel centres sampled from the coarser mask
        height, width = mask.shape
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        cols = np.floor((np.arange(x0, int(np.ceil(x + width * scale))) + 0.5 - x) / scale).astype(int)
        rows = np.floor((np.arange(y0, int(np.ceil(y + height * scale))) + 0.5 - y) / scale).astype(int)
        mask = mask[np.ix_(np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1))]
        return Crop(mask, x0, y0)
    return Crop(mask, int(round(x)), int(round(y)))


def seam_lines(tiles: Sequence, region: tuple[int, int, int, int]) -> tuple[set[int], set[int]]:
    """Level-0 x and y of every window border and core seam of ``tiles``, the region's own border aside."""
    rx, ry, rw, rh = region
    xs, ys = set(), set()
    for tile in tiles:
        d = tile.downsample
        for rect in (tile.window, tile.core):
            xs |= {round(rect.x * d), round(rect.x2 * d)}
            ys |= {round(rect.y * d), round(rect.y2 * d)}
    return xs - {rx, rx + rw}, ys - {ry, ry + rh}


def _longest_run(flags: np.ndarray) -> int:
    if not flags.any():
        return 0
    padded = np.concatenate(([0], flags.astype(np.int8), [0]))
    changes = np.flatnonzero(np.diff(padded))
    return int((changes[1::2] - changes[0::2]).max())


def seam_edges(crops: Sequence[Crop], lines: tuple[set[int], set[int]], min_run: int = MIN_RUN) -> list[tuple[int, str, int, int]]:
    """Edges of objects running straight along a seam line for more than ``min_run`` pixels:
    (object index, "x" or "y", the line, the run's length)."""
    xs, ys = lines
    found = []
    for index, crop in enumerate(crops):
        mask = np.pad(crop.mask, 1)  # an edge at the crop's own border is an edge too
        x0, y0 = crop.x - 1, crop.y - 1
        for axis, positions, origin in (("x", xs, x0), ("y", ys, y0)):
            view = mask if axis == "x" else mask.T
            for line in positions:
                column = line - origin  # the boundary between columns column-1 and column
                if not 1 <= column < view.shape[1]:
                    continue
                run = _longest_run(view[:, column - 1] != view[:, column])
                if run > min_run:
                    found.append((index, axis, line, run))
    return found


def _iou(a: Crop, b: Crop) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    both = np.count_nonzero(a.mask[y0 - a.y:y1 - a.y, x0 - a.x:x1 - a.x] & b.mask[y0 - b.y:y1 - b.y, x0 - b.x:x1 - b.x])
    union = np.count_nonzero(a.mask) + np.count_nonzero(b.mask) - both
    return both / union if union else 0.0


def duplicates(crops: Sequence[Crop], threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Pairs of objects that are the same object: mask IoU above ``threshold``."""
    order = sorted(range(len(crops)), key=lambda i: crops[i].x)
    found = []
    for position, i in enumerate(order):
        for j in order[position + 1:]:
            if crops[j].x >= crops[i].box[2]:
                break
            value = _iou(crops[i], crops[j])
            if value > threshold:
                found.append((min(i, j), max(i, j), value))
    return found


def best_iou(crop: Crop, others: Sequence[Crop]) -> float:
    return max((_iou(crop, other) for other in others), default=0.0)
