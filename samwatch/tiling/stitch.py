"""Joining tiles' masks into objects: each object once, neither cut at a seam nor duplicated.

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
  the halo) is the union of its fragments.
* An object whose box grows beyond ``max_pixels`` (tissue, background: far larger than any
  window) is never joined into one mask: it comes out in pieces, each fragment cut to its tile's
  core (the cores partition the region, so the pieces cover it once), and its fragments are
  dropped as soon as no unprocessed tile can meet them, which keeps memory to about a row of tiles.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from samwatch.models.base import Detection
from samwatch.tiling.plan import Rect, TileSpec


@dataclass
class _Fragment:
    detection: Detection
    tile: TileSpec
    box: Rect  # grid pixels
    cut: bool
    emitted: bool = False  # as a piece of an oversized object


@dataclass
class _Group:
    fragments: list[_Fragment]
    box: Rect
    cells: set[tuple[int, int]] = field(default_factory=set)
    oversized: bool = False  # reported in pieces as its fragments come


def _union_box(a: Rect, b: Rect) -> Rect:
    x, y = min(a.x, b.x), min(a.y, b.y)
    return Rect(x, y, max(a.x2, b.x2) - x, max(a.y2, b.y2) - y)


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
    soon as it is final. Tiles are those of one ``plan_tiles`` call (one grid, equal windows)."""

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

    # -- the public flow ------------------------------------------------------------------

    def add(self, tile: TileSpec, detections: Sequence[Detection]) -> Iterator[Detection]:
        """Add one tile's detections (level-0 placed, cropped to their box); yield what became final."""
        for detection in detections:
            yield from self._insert(self._fragment(tile, detection))
        self._done.add(tile.index)
        yield from self._flush(final=False)

    def finish(self) -> Iterator[Detection]:
        yield from self._flush(final=True)

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

    def _insert(self, fragment: _Fragment) -> Iterator[Detection]:
        """File the fragment with the object it belongs to; yields pieces of oversized objects."""
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
        group.box = _union_box(group.box, fragment.box)
        self._index(gid, self._cells_of(group.box))
        if group.oversized or group.box.w * group.box.h > self.max_pixels:
            group.oversized = True
            yield from _core_pieces(group.fragments)

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
            area = seen_by_both and seen_by_both.intersection(_union_box(member.box, fragment.box))
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
            if group.oversized:  # its pieces are out; keep only fragments a coming tile could match
                group.fragments = [f for f in group.fragments if not final and not self._settled(f.box)]
                if not group.fragments:
                    self._remove(gid)
            elif final or self._settled(group.box):
                yield _resolve(self._remove(gid))


def _core_pieces(fragments: Sequence[_Fragment]) -> Iterator[Detection]:
    """Each fragment not yet reported, cut to its tile's core, in level-0 pixels (empty pieces skipped)."""
    for fragment in fragments:
        if fragment.emitted:
            continue
        fragment.emitted = True
        part = fragment.box.intersection(fragment.tile.core)
        if part is None:
            continue
        mask = _paste(fragment, part)
        if mask.any():
            source, d = fragment.detection, fragment.tile.downsample
            yield Detection(mask=mask, score=source.score, prompt_idx=source.prompt_idx, mask_idx=source.mask_idx,
                            frame=source.frame, label=source.label, color=source.color, extra=dict(source.extra),
                            origin=(part.x * d, part.y * d), scale=d)


def _resolve(group: _Group) -> Detection:
    whole = [f for f in group.fragments if not f.cut]
    if whole:
        def preference(fragment: _Fragment) -> tuple[bool, float]:
            centre = (fragment.box.x + fragment.box.w / 2, fragment.box.y + fragment.box.h / 2)
            return fragment.tile.core.contains(*centre), fragment.detection.score

        return max(whole, key=preference).detection
    best = max(group.fragments, key=lambda f: f.detection.score).detection
    mask = np.zeros((group.box.h, group.box.w), dtype=bool)
    for fragment in group.fragments:
        mask |= _paste(fragment, group.box)
    d = group.fragments[0].tile.downsample
    return Detection(
        mask=mask, score=best.score, prompt_idx=best.prompt_idx, mask_idx=best.mask_idx, frame=best.frame,
        label=best.label, color=best.color, extra=dict(best.extra),
        origin=(group.box.x * d, group.box.y * d), scale=d,
    )
