"""Where the model looks: tiles over a region (automask, text) and windows around prompts.

Geometry is planned on a *grid*: the pixels the model sees at downsample ``d``, grid pixel
(gx, gy) covering level-0 pixels [gx·d, (gx+1)·d)². All tiles of one job share one grid, so
masks of neighbouring tiles line up to the pixel when they are stitched. A prompt window for a
box larger than a window gets a grid of its own (coarser), since nothing is stitched to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from samwatch.sidecars.schema import Prompt

#: Prompt windows snap to multiples of a quarter window, so a sidecar whose prompts moved a
#: little asks for the same windows again and finds their embeddings cached.
_SNAP_FRACTION = 4
#: Context around a prompt larger than a window (as a fraction of its longer side).
_BIG_PROMPT_MARGIN = 1 / 16


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle of pixels [x, x + w) × [y, y + h)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def x2(self) -> int:
        return self.x + self.w

    @property
    def y2(self) -> int:
        return self.y + self.h

    def intersection(self, other: Rect) -> Rect | None:
        x, y = max(self.x, other.x), max(self.y, other.y)
        x2, y2 = min(self.x2, other.x2), min(self.y2, other.y2)
        return Rect(x, y, x2 - x, y2 - y) if x2 > x and y2 > y else None

    def union(self, other: Rect) -> Rect:
        """The smallest rectangle holding both."""
        x, y = min(self.x, other.x), min(self.y, other.y)
        return Rect(x, y, max(self.x2, other.x2) - x, max(self.y2, other.y2) - y)

    def contains(self, px: float, py: float) -> bool:
        return self.x <= px < self.x2 and self.y <= py < self.y2


@dataclass(frozen=True)
class TileSpec:
    """One unit of work: a window of the image the model sees once (one embedding).

    ``window`` and ``core`` are grid pixels at ``downsample``; ``core`` is the part whose objects
    this tile owns (tiles' cores partition the region; a prompt window owns all of itself).
    ``level`` is the pyramid level its pixels are read from.
    """

    index: int
    count: int
    window: Rect
    core: Rect
    downsample: float
    level: int = 0
    prompt_indices: tuple[int, ...] = ()

    def level0(self) -> Rect:
        """The level-0 pixels the window covers (whole pixels, rounded outwards)."""
        d = self.downsample
        x, y = math.floor(self.window.x * d), math.floor(self.window.y * d)
        return Rect(x, y, math.ceil(self.window.x2 * d) - x, math.ceil(self.window.y2 * d) - y)

    @property
    def geometry_key(self) -> str:
        """What identifies this window's pixels within an image (for embedding caches)."""
        w = self.window
        return f"L{self.level}:d{self.downsample:g}:{w.x},{w.y},{w.w},{w.h}"


def to_grid(region: Rect, downsample: float) -> Rect:
    """The smallest grid rectangle covering the level-0 ``region``."""
    x, y = math.floor(region.x / downsample), math.floor(region.y / downsample)
    return Rect(x, y, math.ceil(region.x2 / downsample) - x, math.ceil(region.y2 / downsample) - y)


def _starts(start: int, length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: windows of ``tile`` evenly spread, neighbours sharing at least ``overlap``."""
    if length <= tile:
        return [start]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [start + round(i * (length - tile) / (count - 1)) for i in range(count)]


def _cores(start: int, length: int, starts: list[int], size: int) -> list[tuple[int, int]]:
    """Each window's owned span: seams halfway through the overlaps, so cores partition the axis."""
    bounds = [start] + [(b + a + size) // 2 for a, b in zip(starts, starts[1:])] + [start + length]
    return list(zip(bounds, bounds[1:]))


def plan_tiles(region: Rect, tile_size: int, overlap: int, downsample: float, level: int) -> list[TileSpec]:
    """Tiles over the grid ``region``, row by row: every window ``tile_size`` (or the region, if smaller)."""
    xs = _starts(region.x, region.w, tile_size, overlap)
    ys = _starts(region.y, region.h, tile_size, overlap)
    width, height = min(tile_size, region.w), min(tile_size, region.h)
    x_cores, y_cores = _cores(region.x, region.w, xs, width), _cores(region.y, region.h, ys, height)
    cells = [(y, yc, x, xc) for y, yc in zip(ys, y_cores) for x, xc in zip(xs, x_cores)]
    return [
        TileSpec(
            index=index, count=len(cells), window=Rect(x, y, width, height),
            core=Rect(xc[0], yc[0], xc[1] - xc[0], yc[1] - yc[0]), downsample=downsample, level=level,
        )
        for index, (y, yc, x, xc) in enumerate(cells)
    ]


def prompt_extent(prompt: Prompt) -> tuple[float, float, float, float]:
    """The level-0 box a prompt's box and points span."""
    xs = [p[0] for p in prompt.points] + ([prompt.bbox[0], prompt.bbox[2]] if prompt.bbox is not None else [])
    ys = [p[1] for p in prompt.points] + ([prompt.bbox[1], prompt.bbox[3]] if prompt.bbox is not None else [])
    return min(xs), min(ys), max(xs), max(ys)


def _place(low: float, high: float, span: float, bound_low: int, bound_high: int, snap: float) -> tuple[int, int]:
    """A window of ``span`` around [low, high] inside [bound_low, bound_high): snapped where that
    still contains the extent, shifted inside the bounds, cut to them if they are smaller."""
    if bound_high - bound_low <= span:
        return bound_low, bound_high
    start = (low + high - span) / 2
    snapped = round(start / snap) * snap if snap > 0 else start
    if snapped <= low and snapped + span >= high:
        start = snapped
    start = min(max(start, bound_low), bound_high - span)
    return math.floor(start), math.floor(start) + math.ceil(span)


def plan_prompt_windows(
    prompts: Sequence[Prompt], region: Rect, tile_size: int, overlap: int, downsample: float,
    level_for: Callable[[float], int],
) -> list[TileSpec]:
    """Windows for prompts, greedily grouped: prompts that fit together in one window (with
    ``overlap`` grid pixels of context on every side) share it and its embedding.

    ``region`` is level-0. A prompt larger than that gets a window of its own around it, on a
    coarser grid so it still fits the model input, read from the level ``level_for(d)`` picks.
    """
    span = tile_size * downsample
    room = span - 2 * overlap * downsample
    extents = [prompt_extent(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (extents[i][1], extents[i][0]))
    assigned: set[int] = set()
    planned: list[tuple[float, Rect, tuple[int, ...]]] = []
    for first in order:
        if first in assigned:
            continue
        x1, y1, x2, y2 = extents[first]
        members = [first]
        assigned.add(first)
        if x2 - x1 > room or y2 - y1 > room:
            side = max(x2 - x1, y2 - y1) * (1 + 2 * _BIG_PROMPT_MARGIN)
            scale = max(downsample, side / tile_size)
            window_span, snap = side, 0.0
        else:
            for other in order:
                if other in assigned:
                    continue
                ox1, oy1, ox2, oy2 = extents[other]
                ux1, uy1, ux2, uy2 = min(x1, ox1), min(y1, oy1), max(x2, ox2), max(y2, oy2)
                if ux2 - ux1 <= room and uy2 - uy1 <= room:
                    x1, y1, x2, y2 = ux1, uy1, ux2, uy2
                    members.append(other)
                    assigned.add(other)
            scale, window_span, snap = downsample, span, span / _SNAP_FRACTION
        wx, wx2 = _place(x1, x2, window_span, region.x, region.x2, snap)
        wy, wy2 = _place(y1, y2, window_span, region.y, region.y2, snap)
        planned.append((scale, Rect(wx, wy, wx2 - wx, wy2 - wy), tuple(sorted(members))))
    windows = []
    for index, (scale, level0, members) in enumerate(planned):
        grid = to_grid(level0, scale)
        windows.append(TileSpec(index=index, count=len(planned), window=grid, core=grid, downsample=scale,
                                level=level_for(scale), prompt_indices=members))
    return windows
