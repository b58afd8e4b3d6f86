"""GeoJSON polygons back to pixels (by pixel centres, the inverse of ``outline``), and mask overlap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def polygons_of(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"]]
    if geometry["type"] == "MultiPolygon":
        return geometry["coordinates"]
    raise ValueError(f"unsupported geometry type {geometry['type']!r}")


def ring_edges(rings: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The edges of closed rings (N x 2 arrays) as start and end points, for :func:`rasterize_edges`."""
    if not rings:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate([r[:-1] for r in rings]), np.concatenate([r[1:] for r in rings])


def rasterize(geometry: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the pixels whose centre lies inside ``geometry``.

    Inverse of :func:`mask_to_geometry`: ``rasterize(mask_to_geometry(m), m.shape) == m``.
    Uses the even-odd rule over all rings, which for valid geometry is the union of the
    polygons minus their holes. Scanlines through pixel centres never meet a corner of an
    exact (pixel-corner) polygon, so the result has no boundary ambiguity.
    """
    rings = [np.asarray(ring, np.float64) for rings in polygons_of(geometry) for ring in rings]
    return rasterize_edges(*ring_edges(rings), shape)


def rasterize_edges(
    p: np.ndarray, q: np.ndarray, shape: tuple[int, int], *, origin: tuple[float, float] = (0, 0), scale: float = 1.0
) -> np.ndarray:
    """:func:`rasterize` of the edges from :func:`ring_edges`, for a window: output pixel
    (row, col) covers [origin + scale * (col, row), origin + scale * (col + 1, row + 1)) of the
    geometry's coordinates (a tile of a label image, or a coarser pyramid level)."""
    height, width = shape
    if origin != (0, 0) or scale != 1:
        p = (p - np.asarray(origin, np.float64)) / scale
        q = (q - np.asarray(origin, np.float64)) / scale
    sloped = p[:, 1] != q[:, 1]  # horizontal edges never cross a pixel-centre scanline
    p, q = p[sloped], q[sloped]
    # Rows whose centre y + 0.5 lies in [min(y), max(y)) of an edge cross that edge once.
    first = np.clip(np.ceil(np.minimum(p[:, 1], q[:, 1]) - 0.5), 0, height).astype(np.int64)
    stop = np.clip(np.ceil(np.maximum(p[:, 1], q[:, 1]) - 0.5), 0, height).astype(np.int64)
    n = np.maximum(stop - first, 0)
    edge = np.repeat(np.arange(len(p)), n)
    row = first[edge] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    t = (row + 0.5 - p[edge, 1]) / (q[edge, 1] - p[edge, 1])
    x = p[edge, 0] + t * (q[edge, 0] - p[edge, 0])
    # Each crossing flips inside/outside for every pixel whose centre lies to its right.
    column = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    flips = np.bincount(row * (width + 1) + column, minlength=height * (width + 1))
    inside = np.cumsum(flips.reshape(height, width + 1), axis=1) % 2 == 1
    return inside[:, :width]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union
