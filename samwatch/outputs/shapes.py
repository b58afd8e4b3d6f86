"""Result features read once into arrays that the preview and the label image share.

Features are read defensively: any property may be missing (other writers add and rename
properties over time), and a geometry that is not a (Multi)Polygon is skipped, so a
cosmetic output never fails a job whose GeoJSON is fine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from samwatch.geometry.features import class_color
from samwatch.geometry.raster import ring_edges

_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class Shape:
    """One feature: its label value, class, colour, plane and rings in image pixels."""

    label: int  # object_idx + 1: the value in the label image
    index: int  # position in the collection (painting order among equal quality)
    name: str
    color: tuple[int, int, int]
    quality: float
    prompt_idx: int | None
    plane: int
    rings: tuple[np.ndarray, ...]  # closed rings, float64 N x 2 (x, y)
    edges: tuple[np.ndarray, np.ndarray]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1

    def overlaps(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        return self.box[0] < x1 and x0 < self.box[2] and self.box[1] < y1 and y0 < self.box[3]


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _plane(feature: dict[str, Any], properties: dict[str, Any], frame_axis: str) -> int:
    frame = properties.get("frame")
    if isinstance(frame, int):
        return frame
    plane = (feature.get("geometry") or {}).get("plane") or {}
    value = plane.get(frame_axis.lower()) if isinstance(plane, dict) else None
    return value if isinstance(value, int) else 0


def _classification(properties: dict[str, Any]) -> tuple[str, tuple[int, int, int]]:
    classification = properties.get("classification")
    classification = classification if isinstance(classification, dict) else {}
    name = classification.get("name") or properties.get("label") or "object"
    color = classification.get("color")
    if not (isinstance(color, (list, tuple)) and len(color) == 3):
        color = class_color(str(name))
    return str(name), (int(color[0]), int(color[1]), int(color[2]))


def read_shapes(features: Iterable[dict[str, Any]], *, frame_axis: str = "T") -> list[Shape]:
    """The drawable features; ``frame_axis`` (T or Z) says which plane coordinate is the frame."""
    shapes = []
    for index, feature in enumerate(features):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") not in _POLYGONAL:
            continue
        polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
        rings = tuple(np.asarray(ring, np.float64) for polygon in polygons for ring in polygon if len(ring) >= 4)
        if not rings:
            continue
        properties = feature.get("properties") or {}
        name, color = _classification(properties)
        object_idx = properties.get("object_idx")
        label = (object_idx if isinstance(object_idx, int) and object_idx >= 0 else index) + 1
        prompt_idx = properties.get("prompt_idx")
        every = np.concatenate(rings)
        low, high = every.min(axis=0), every.max(axis=0)
        shapes.append(Shape(
            label=label, index=index, name=name, color=color,
            quality=_number(properties.get("quality"), 0.0),
            prompt_idx=prompt_idx if isinstance(prompt_idx, int) else None,
            plane=_plane(feature, properties, frame_axis),
            rings=rings, edges=ring_edges(rings),
            box=(float(low[0]), float(low[1]), float(high[0]), float(high[1])),
        ))
    return shapes


def painting_order(shapes: Iterable[Shape]) -> list[Shape]:
    """The overlap rule: a pixel covered by several features takes the one with the higher
    quality, and among equal quality the later feature; painting in this order does it."""
    return sorted(shapes, key=lambda shape: (shape.quality, shape.index))
