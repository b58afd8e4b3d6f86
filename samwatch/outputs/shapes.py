"""A result's objects, typed: built once from the masks, written by every output.

The job traces each mask into a :class:`Shape` as it arrives (the mask is dropped, the rings
are small); the GeoJSON (``outputs/geojson.py``), the preview, the label image and its CSV are
all writers of the same shapes, so nothing is encoded to GeoJSON and parsed back.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from samwatch.geometry.raster import ring_edges


def class_color(name: str) -> list[int]:
    """A stable, saturated [r, g, b] colour for a classification name.

    Derived from SHA-256 of the name, so it is the same in every process and run (Python's
    own ``hash`` is salted per process).
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.55 + 0.35 * digest[4] / 255
    value = 0.75 + 0.20 * digest[5] / 255
    return [round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value)]


@dataclass(frozen=True)
class Shape:
    """One object of a result: its polygons in image pixels and what the outputs say of it."""

    polygons: tuple[tuple[np.ndarray, ...], ...]  # each: closed exterior ring, then holes (n x 2, as traced)
    name: str  # the classification
    color: tuple[int, int, int]
    object_idx: int
    index: int  # position in the result (painting order among equal quality)
    quality: float
    model: str
    object_type: str = "annotation"
    prompt_idx: int | None = None
    mask_idx: int | None = None  # None: the job keeps one mask per prompt, so no index is written
    obj_id: int | None = None  # a video object's id
    frame: int | None = None  # stacks and videos: the frame it is on
    zt: tuple[int, int] | None = None  # (z, t) of a stack's or video's frame, as QuPath places it
    extra: Mapping[str, Any] = field(default_factory=dict)  # the model's scores, the QuPath object it came from

    @property
    def label(self) -> int:
        """Its value in the label image."""
        return (self.object_idx if self.object_idx >= 0 else self.index) + 1

    @property
    def plane(self) -> int:
        """The plane it is drawn and labelled on."""
        return self.frame if self.frame is not None else 0

    @cached_property
    def rings(self) -> tuple[np.ndarray, ...]:
        """Every closed ring as float64 N x 2 (x, y), for drawing and rasterising."""
        return tuple(np.asarray(ring, np.float64) for polygon in self.polygons for ring in polygon if len(ring) >= 4)

    @cached_property
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        return ring_edges(self.rings)

    @cached_property
    def box(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 of its rings."""
        every = np.concatenate(self.rings)
        low, high = every.min(axis=0), every.max(axis=0)
        return (float(low[0]), float(low[1]), float(high[0]), float(high[1]))

    def overlaps(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        return self.box[0] < x1 and x0 < self.box[2] and self.box[1] < y1 and y0 < self.box[3]


def drawable(shapes: Iterable[Shape]) -> list[Shape]:
    """The shapes with a ring to draw or fill (a ring of fewer than four positions has no area)."""
    return [shape for shape in shapes if shape.rings]


def painting_order(shapes: Iterable[Shape]) -> list[Shape]:
    """The overlap rule: a pixel covered by several features takes the one with the higher
    quality, and among equal quality the later feature; painting in this order does it."""
    return sorted(shapes, key=lambda shape: (shape.quality, shape.index))
