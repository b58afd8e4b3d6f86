"""A mask to its GeoJSON Polygon/MultiPolygon: traced, optionally simplified, placed and ordered."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from samwatch.geometry.simplify import simplify
from samwatch.geometry.trace import Rings, offsets, trace


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.view(np.uint8)
    if mask.dtype == np.uint8:
        return mask
    return (mask != 0).view(np.uint8)


def _geojson(rings: Rings, offset: np.ndarray, scale: float = 1, *, arrays: bool = False) -> dict[str, Any]:
    """Closed, ordered GeoJSON rings at ``offset + scale * vertex``: polygons by exterior,
    exterior then holes; each ring a list of [x, y] lists, or with ``arrays`` an n × 2 array."""
    vertices, bounds, polygon, is_hole = rings
    # Each ring starts at its top-most, then left-most vertex: the smallest row-major key
    # (unique within a ring); rings are ordered by that same key.
    key = vertices[:, 1] * (int(vertices[:, 0].max()) + 1) + vertices[:, 0]
    lowest = np.repeat(np.minimum.reduceat(key, bounds[:-1]), np.diff(bounds))
    first = np.flatnonzero(key == lowest)
    order = np.zeros(1, np.int64)
    if len(first) > 1:
        exterior = np.zeros(polygon.max() + 1, np.int64)
        exterior[polygon[~is_hole]] = key[first[~is_hole]]
        order = np.lexsort((key[first], is_hole, exterior[polygon]))
    # Gather each ring rotated to its start and closed (n + 1 positions), in output order.
    n = np.diff(bounds)[order]
    closed = offsets(n + 1)
    ring = np.repeat(np.arange(len(order)), n + 1)
    step = np.arange(closed[-1]) - closed[ring] + (first[order] - bounds[order])[ring]
    picked = vertices[bounds[order][ring] + step % n[ring]]
    coordinates = (picked * scale if scale != 1 else picked) + offset
    listed, edges = (coordinates if arrays else coordinates.tolist()), closed.tolist()
    ring_lists = [listed[a:b] for a, b in zip(edges[:-1], edges[1:])]  # row slices: views of one array
    heads = np.flatnonzero(~is_hole[order]).tolist() + [len(order)]
    polygons = [ring_lists[a:b] for a, b in zip(heads[:-1], heads[1:])]
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def mask_to_geometry(
    mask: np.ndarray,
    *,
    simplify_tolerance: float = 0.0,
    offset: tuple[float, float] = (0, 0),
    scale: float = 1.0,
    arrays: bool = False,
) -> dict[str, Any] | None:
    """GeoJSON Polygon/MultiPolygon outlining the nonzero pixels of ``mask``.

    Returns None for an empty mask (or one whose every part collapses when simplified).
    ``simplify_tolerance`` > 0 applies Douglas-Peucker (in pixels) to each ring, drops
    rings that collapse, and falls back to less simplification for any polygon whose
    simplified rings would cross or touch. Each vertex becomes ``offset + scale * vertex``
    (a mask read at a pyramid level, or a tile placed in the slide); coordinates are Python
    ints unless the offset or scale is fractional.

    ``arrays`` gives each ring as an n × 2 numpy array (int64, or float64 when fractional)
    instead of nested lists: what jobs use, since a noisy mask of 10⁵ vertices as lists is
    3·10⁵ Python objects, whose allocation and garbage-collector passes cost ten times the
    tracing itself; orjson writes the arrays directly (atomic.py ``OPT_SERIALIZE_NUMPY``).
    """
    binary = _as_uint8(mask)
    x, y, width, height = cv2.boundingRect(binary)
    if width == 0 or height == 0:
        return None
    # Tracing only the bounding box keeps small objects in large frames cheap.
    rings = trace(binary[y : y + height, x : x + width])
    if simplify_tolerance > 0:
        rings = simplify(rings, simplify_tolerance)
        if len(rings.polygon) == 0:
            return None
    dx, dy = offset
    if all(float(v).is_integer() for v in (dx, dy, scale)):
        scale = int(scale)
        return _geojson(rings, np.array([int(dx) + x * scale, int(dy) + y * scale]), scale, arrays=arrays)
    return _geojson(rings, np.array([dx + x * scale, dy + y * scale], np.float64), scale, arrays=arrays)
