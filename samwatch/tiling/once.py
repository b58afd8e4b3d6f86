"""Each object written once: a detection that is the same object as one already written (mask
IoU above ``iou``, compared in level-0 pixels whatever downsample each was segmented at) is dropped.

Such pairs are whole views of two tiles that the stitcher could not match, second looks that
found an object already written, and (rarely) two masks of one tile whose boxes differ enough
for automask's box NMS to keep both. Masks are held bit-packed and let go once nothing still to
come can meet them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from samwatch.models.base import Detection
from samwatch.tiling.plan import Rect

#: Comparisons sample both masks on a grid of at most this many points.
_MAX_SAMPLES = 1 << 20


@dataclass
class _Written:
    packed: np.ndarray
    shape: tuple[int, int]
    origin: tuple[float, float]
    scale: float
    area: float  # level-0 pixels
    box: Rect  # level-0, rounded outwards

    def sample(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The mask at level-0 points (a grid: ``xs`` columns, ``ys`` rows), False outside it."""
        cols = np.floor((xs - self.origin[0]) / self.scale).astype(np.int64)
        rows = np.floor((ys - self.origin[1]) / self.scale).astype(np.int64)
        height, width = self.shape
        col_ok, row_ok = (cols >= 0) & (cols < width), (rows >= 0) & (rows < height)
        mask = np.unpackbits(self.packed, count=height * width).reshape(height, width).astype(bool)
        out = np.zeros((len(ys), len(xs)), bool)
        out[np.ix_(row_ok, col_ok)] = mask[np.ix_(rows[row_ok], cols[col_ok])]
        return out


def level0_box(detection: Detection) -> Rect:
    """The level-0 pixels a placed detection's mask spans (rounded outwards)."""
    x, y = math.floor(detection.origin[0]), math.floor(detection.origin[1])
    height, width = detection.mask.shape
    return Rect(x, y, math.ceil(detection.origin[0] + width * detection.scale) - x,
                math.ceil(detection.origin[1] + height * detection.scale) - y)


def entry_of(detection: Detection) -> _Written:
    """``detection`` as :class:`Once` holds it."""
    mask, scale = detection.mask, detection.scale
    return _Written(np.packbits(mask, axis=None), mask.shape, detection.origin, scale,
                    float(np.count_nonzero(mask)) * scale * scale, level0_box(detection))


def mask_iou(a: _Written, b: _Written) -> float:
    both = a.box.intersection(b.box)
    if both is None:
        return 0.0
    step = max(min(a.scale, b.scale), math.sqrt(both.w * both.h / _MAX_SAMPLES))
    xs = both.x + (np.arange(math.ceil(both.w / step)) + 0.5) * step
    ys = both.y + (np.arange(math.ceil(both.h / step)) + 0.5) * step
    common = float(np.count_nonzero(a.sample(xs, ys) & b.sample(xs, ys))) * step * step
    union = a.area + b.area - common
    return common / union if union > 0 else 0.0


class Once:
    """The objects written so far, by cell of ``cell`` level-0 pixels."""

    def __init__(self, cell: int, iou: float = 0.5) -> None:
        self.cell = max(1, cell)
        self.iou = iou
        self._entries: dict[int, _Written] = {}
        self._cells: dict[tuple[int, int], set[int]] = {}
        self._next = 0
        self.dropped = 0

    def _cells_of(self, box: Rect) -> list[tuple[int, int]]:
        c = self.cell
        return [(cx, cy) for cx in range(box.x // c, (box.x2 - 1) // c + 1) for cy in range(box.y // c, (box.y2 - 1) // c + 1)]

    def admit(self, detection: Detection) -> bool:
        """Whether ``detection`` is a new object (then it is remembered)."""
        entry = entry_of(detection)
        cells = self._cells_of(entry.box)
        near = {key for cell in cells for key in self._cells.get(cell, ())}
        for key in near:
            if mask_iou(entry, self._entries[key]) > self.iou:
                self.dropped += 1
                return False
        key, self._next = self._next, self._next + 1
        self._entries[key] = entry
        for cell in cells:
            self._cells.setdefault(cell, set()).add(key)
        return True

    def forget(self, done: Callable[[Rect], bool]) -> None:
        """Let go of the objects for which ``done(box)`` says nothing still to come can meet them."""
        for key, entry in list(self._entries.items()):
            if done(entry.box):
                del self._entries[key]
                for cell in self._cells_of(entry.box):
                    members = self._cells[cell]
                    members.discard(key)
                    if not members:
                        del self._cells[cell]

    def __len__(self) -> int:
        return len(self._entries)
