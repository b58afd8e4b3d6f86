"""Joining tiles' masks into objects, and handing on what no tile saw whole.

micro-sam's tiled automatic segmentation drops every mask that touches a tile's border and then
de-duplicates whole-image masks by box NMS; an object wider than the halo is lost, and every
mask is held at the size of the image until the end. Here masks stay cropped to their box and
stream out as soon as no unprocessed tile can still touch them:

* A fragment is *cut* when its box reaches a border of its tile's window that is not a border
  of the region (the object goes on in a neighbour).
* Fragments of different tiles are the same object when, over the pixels both tiles saw, their
  IoU is at least ``match_iou``. A fragment joins the one object it overlaps best, and an object
  takes one fragment per tile, so masks that overlap within a tile (a cell and its nucleus, say)
  are never chained into one through a neighbour.
* An object seen whole somewhere is that whole view; of several whole views, the one from the
  tile whose core holds its centre (then the best score). An object cut everywhere (larger than
  the halo) is the union of its fragments, when that union goes on past every window border its
  fragments reach.
* Anything else is not written as the tiles saw it: a fragment cut at its window's border that no
  neighbour confirms, a union that still ends at a window border, and an object whose box grows
  beyond ``max_pixels`` (tissue, background: far larger than any window; its fragments are
  dropped as soon as no unprocessed tile can meet them, which keeps memory to about a row of
  tiles) become :attr:`Stitcher.looks`, to be segmented again whole (samwatch.tiling.refine).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from samwatch.models.base import Detection
from samwatch.tiling.plan import Rect, TileSpec
from samwatch.tiling.refine import SecondLook, metadata_of, view

#: A union of fragments that ends at a window border for this many pixels in a row is still cut.
_OPEN_RUN = 8


@dataclass
class _Fragment:
    detection: Detection
    tile: TileSpec
    box: Rect  # grid pixels
    cut: bool


@dataclass
class _Group:
    fragments: list[_Fragment]
    box: Rect
    cells: set[tuple[int, int]] = field(default_factory=set)
    oversized: bool = False  # too large to hold: only its box and metadata are kept
    template: Detection | None = None  # the best-scored fragment's metadata, once oversized


def _paste(fragment: _Fragment, area: Rect) -> np.ndarray:
    """The fragment's mask on ``area`` (grid pixels), False outside its box."""
    out = np.zeros((area.h, area.w), dtype=bool)
    part = fragment.box.intersection(area)
    if part is not None:
        out[part.y - area.y:part.y2 - area.y, part.x - area.x:part.x2 - area.x] = fragment.detection.mask[
            part.y - fragment.box.y:part.y2 - fragment.box.y, part.x - fragment.box.x:part.x2 - fragment.box.x
        ]
    return out


class Stitcher:
    """Takes each tile's placed detections (any tile order) and yields each object once, as
    soon as it is final; what it cannot finish goes to :attr:`looks`. Tiles are those of one ``plan_tiles`` call (one
    grid, equal windows)."""

    def __init__(self, tiles: Sequence[TileSpec], *, match_iou: float = 0.5, max_pixels: int = 1 << 26) -> None:
        self.match_iou = match_iou
        self.max_pixels = max_pixels
        self._tiles = list(tiles)
        self._xs = sorted({t.window.x for t in tiles})
        self._ys = sorted({t.window.y for t in tiles})
        self._window_w, self._window_h = tiles[0].window.w, tiles[0].window.h
        self._region = Rect(self._xs[0], self._ys[0], self._xs[-1] + self._window_w - self._xs[0],
                            self._ys[-1] + self._window_h - self._ys[0])
        self._cell = max(self._window_w, self._window_h)
        self._done: set[int] = set()
        self._groups: dict[int, _Group] = {}
        self._cells: dict[tuple[int, int], set[int]] = {}
        self._next_id = 0
        self.looks: list[SecondLook] = []

    # -- the public flow ------------------------------------------------------------------

    def add(self, tile: TileSpec, detections: Sequence[Detection]) -> Iterator[Detection]:
        """Add one tile's detections (level-0 placed, cropped to their box); yield what became final."""
        for detection in detections:
            self._insert(self._fragment(tile, detection))
        self._done.add(tile.index)
        yield from self._flush(final=False)

    def finish(self) -> Iterator[Detection]:
        yield from self._flush(final=True)

    def settled(self, box: Rect) -> bool:
        """No tile still to come can meet ``box`` (level-0 pixels)."""
        d = self._tiles[0].downsample
        grid = Rect(math.floor(box.x / d), math.floor(box.y / d), math.ceil(box.w / d) + 1, math.ceil(box.h / d) + 1)
        return self._settled(grid)

    @property
    def pending(self) -> int:
        return len(self._groups)

    # -- fragments and groups ---------------------------------------------------------------

    def _fragment(self, tile: TileSpec, detection: Detection) -> _Fragment:
        d = tile.downsample
        height, width = detection.mask.shape
        box = Rect(round(detection.origin[0] / d), round(detection.origin[1] / d), width, height)
        window, region = tile.window, self._region
        cut = (
            (box.x <= window.x and window.x > region.x) or (box.y <= window.y and window.y > region.y)
            or (box.x2 >= window.x2 and window.x2 < region.x2) or (box.y2 >= window.y2 and window.y2 < region.y2)
        )
        return _Fragment(detection, tile, box, cut)

    def _cells_of(self, box: Rect) -> set[tuple[int, int]]:
        c = self._cell
        return {(cx, cy) for cx in range(box.x // c, (box.x2 - 1) // c + 1) for cy in range(box.y // c, (box.y2 - 1) // c + 1)}

    def _insert(self, fragment: _Fragment) -> None:
        """File the fragment with the object it belongs to."""
        cells = self._cells_of(fragment.box)
        candidates = {gid for cell in cells for gid in self._cells.get(cell, ())}
        scored = [
            (self._overlap(self._groups[gid], fragment), -gid) for gid in candidates
            if all(member.tile.index != fragment.tile.index for member in self._groups[gid].fragments)
        ]
        best, negative_gid = max(scored, default=(0.0, 0))
        if best < self.match_iou:
            gid = self._next_id
            self._next_id += 1
            self._groups[gid] = _Group([fragment], fragment.box)
            self._index(gid, cells)
            return
        gid = -negative_gid
        group = self._groups[gid]
        group.fragments.append(fragment)
        group.box = group.box.union(fragment.box)
        self._index(gid, self._cells_of(group.box))
        if not group.oversized and group.box.w * group.box.h > self.max_pixels:
            group.oversized = True
            best = max(group.fragments, key=lambda f: f.detection.score).detection
            group.template = metadata_of(best)

    def _index(self, gid: int, cells: set[tuple[int, int]]) -> None:
        group = self._groups[gid]
        for cell in cells - group.cells:
            self._cells.setdefault(cell, set()).add(gid)
        group.cells |= cells

    def _remove(self, gid: int) -> _Group:
        group = self._groups.pop(gid)
        for cell in group.cells:
            members = self._cells[cell]
            members.discard(gid)
            if not members:
                del self._cells[cell]
        return group

    def _overlap(self, group: _Group, fragment: _Fragment) -> float:
        """The best IoU of ``fragment`` with one of the group's fragments, over what both tiles saw."""
        best = 0.0
        for member in group.fragments:
            seen_by_both = member.tile.window.intersection(fragment.tile.window)
            area = seen_by_both and seen_by_both.intersection(member.box.union(fragment.box))
            if area is None:
                continue
            a, b = _paste(member, area), _paste(fragment, area)
            union = np.count_nonzero(a | b)
            if union:
                best = max(best, np.count_nonzero(a & b) / union)
        return best

    # -- output -----------------------------------------------------------------------------

    def _touching_tiles(self, box: Rect) -> list[int]:
        """Indices of the tiles whose window meets ``box`` (windows form a row-major grid)."""
        cols = range(bisect.bisect_left(self._xs, box.x - self._window_w + 1), bisect.bisect_left(self._xs, box.x2))
        rows = range(bisect.bisect_left(self._ys, box.y - self._window_h + 1), bisect.bisect_left(self._ys, box.y2))
        return [row * len(self._xs) + col for row in rows for col in cols]

    def _settled(self, box: Rect) -> bool:
        """No tile still to come can meet ``box``."""
        return all(index in self._done for index in self._touching_tiles(box))

    def _flush(self, *, final: bool) -> Iterator[Detection]:
        for gid, group in list(self._groups.items()):
            if group.oversized:  # keep only fragments a coming tile could match
                group.fragments = [f for f in group.fragments if not final and not self._settled(f.box)]
                if not group.fragments:
                    self._remove(gid)
                    self.looks.append(SecondLook(self._level0(group.box), group.template, None))
            elif final or self._settled(group.box):
                yield from self._resolve(self._remove(gid))

    def _level0(self, box: Rect) -> Rect:
        d = self._tiles[0].downsample
        x, y = math.floor(box.x * d), math.floor(box.y * d)
        return Rect(x, y, math.ceil(box.x2 * d) - x, math.ceil(box.y2 * d) - y)

    def _resolve(self, group: _Group) -> Iterator[Detection]:
        level = group.fragments[0].tile.level
        whole = [f for f in group.fragments if not f.cut]
        if whole:
            def preference(fragment: _Fragment) -> tuple[bool, float]:
                centre = (fragment.box.x + fragment.box.w / 2, fragment.box.y + fragment.box.h / 2)
                return fragment.tile.core.contains(*centre), fragment.detection.score

            chosen = max(whole, key=preference)
            yield view(chosen.detection, "whole", level)
            return
        best = max(group.fragments, key=lambda f: f.detection.score).detection
        mask = np.zeros((group.box.h, group.box.w), dtype=bool)
        for fragment in group.fragments:
            mask |= _paste(fragment, group.box)
        d = group.fragments[0].tile.downsample
        union = Detection(
            mask=mask, score=best.score, prompt_idx=best.prompt_idx, mask_idx=best.mask_idx, frame=best.frame,
            label=best.label, color=best.color, extra=dict(best.extra),
            origin=(group.box.x * d, group.box.y * d), scale=d,
        )
        if _still_cut(group, mask, self._region):
            self.looks.append(SecondLook(self._level0(group.box), metadata_of(best), union))
        else:
            yield view(union, "joined", level)


def _longest_run(flags: np.ndarray) -> int:
    if not flags.any():
        return 0
    changes = np.flatnonzero(np.diff(np.concatenate(([0], flags.astype(np.int8), [0]))))
    return int((changes[1::2] - changes[0::2]).max())


def _still_cut(group: _Group, mask: np.ndarray, region: Rect) -> bool:
    """Whether the union ``mask`` (on ``group.box``) ends where one of its fragments was cut: a
    fragment reaching an inner border of its window with nothing of the union beyond it."""
    box = group.box
    for fragment in group.fragments:
        if not fragment.cut:
            continue
        f, window = fragment.box, fragment.tile.window
        own = fragment.detection.mask
        sides = (  # (fragment's pixels on the border, the union's pixels just beyond it)
            (f.x <= window.x > region.x, own[:, 0], f.x - 1, "x"),
            (f.x2 >= window.x2 < region.x2, own[:, -1], f.x2, "x"),
            (f.y <= window.y > region.y, own[0, :], f.y - 1, "y"),
            (f.y2 >= window.y2 < region.y2, own[-1, :], f.y2, "y"),
        )
        for touches, edge, beyond, axis in sides:
            if not touches or not edge.any():
                continue
            if axis == "x":
                inside = 0 <= beyond - box.x < box.w
                after = mask[f.y - box.y:f.y2 - box.y, beyond - box.x] if inside else np.zeros_like(edge)
            else:
                inside = 0 <= beyond - box.y < box.h
                after = mask[beyond - box.y, f.x - box.x:f.x2 - box.x] if inside else np.zeros_like(edge)
            if _longest_run(edge & ~after) >= _OPEN_RUN:
                return True
    return False
