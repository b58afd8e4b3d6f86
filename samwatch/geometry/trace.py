"""Exact outlines of a binary mask: 4-connected parts traced along pixel corners into rings
(the conventions are in ``samwatch.geometry``), stored flat for vectorised work."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


# cv2.findContours follows 8-connected regions of nonzero pixels, so it is run on the
# padded *inverted* mask: the regions it follows are then the 8-connected background, and
# the zero regions between them are exactly the 4-connected foreground parts. It returns
# pixel-centre chains; each chain is turned into the crack boundary (pixel corners) with a
# lookup table indexed by the step into and out of each chain pixel. cv2 traces every
# border with the zero region (our foreground) on its right, so the crack boundary walks
# around each traced background pixel keeping it on the left, i.e. visiting that pixel's
# corners anticlockwise on screen: top-left, bottom-left, bottom-right, top-right.


#: Pixel corners doubled (centre at (1, 1)), in the order the walk visits them.
_CORNER_CYCLE = ((0, 0), (0, 2), (2, 2), (2, 0))  # TL, BL, BR, TR: anticlockwise on screen


def _exit_corner(dx: int, dy: int) -> tuple[int, int]:
    """Doubled corner where the walk leaves a pixel along the chain step (dx, dy).

    A diagonal step crosses the one corner shared with the next pixel; a straight step
    crosses the shared edge at its end on the right-hand (foreground) side, (-dy, dx).
    """
    if dx and dy:
        return 1 + dx, 1 + dy
    return 1 + dx - dy, 1 + dy + dx


def _step_turn_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corners emitted at a chain pixel, keyed by ``9 * code(step in) + code(step out)``.

    ``code(dx, dy) = dx + 3 dy + 4``. Returns, per key, how many corners and where they
    start in one flat table of corner offsets (dx, dy) from the pixel's top-left. The walk
    enters where the previous pixel's exit lies and emits corners from there (inclusive)
    to its own exit (exclusive).
    """
    steps = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    count = np.zeros(81, np.int64)
    first = np.zeros(81, np.int64)
    table: list[tuple[int, int]] = []
    for i, (ax, ay) in enumerate(steps):
        for j, (bx, by) in enumerate(steps):
            key = 9 * i + j
            first[key] = len(table)
            if (ax, ay) == (bx, by) == (0, 0):
                n, start = 4, 0  # a lone traced pixel: all four sides
            elif (ax, ay) == (0, 0) or (bx, by) == (0, 0):
                continue  # cannot occur in a chain of two or more pixels
            else:
                ex, ey = _exit_corner(ax, ay)
                start = _CORNER_CYCLE.index((ex - 2 * ax, ey - 2 * ay))
                n = (_CORNER_CYCLE.index(_exit_corner(bx, by)) - start) % 4
                if n == 0 and (ax, ay) == (-bx, -by):
                    n = 4  # in and out through the same corner: around the whole pixel
            count[key] = n
            visited = (_CORNER_CYCLE[start:] + _CORNER_CYCLE)[:n]
            table += [(cx // 2, cy // 2) for cx, cy in visited]
    corners = np.array(table, np.int64)
    for array in (count, first, corners):
        array.flags.writeable = False
    return count, first, corners


_TURN_COUNT, _TURN_FIRST, _TURN_CORNERS = _step_turn_tables()


def ring_index(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cyclic previous/next index of every vertex of rings stored flat with ``bounds``."""
    n = int(bounds[-1])
    prev = np.arange(-1, n - 1)
    nxt = np.arange(1, n + 1)
    prev[bounds[:-1]] = bounds[1:] - 1
    nxt[bounds[1:] - 1] = bounds[:-1]
    return prev, nxt


def _crack_rings(
    points: np.ndarray, bounds: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre chains -> crack rings: corners of the pixels, reduced to the turns.

    Points are packed as ``x + stride * y`` so that every step is 1-D arithmetic; with
    stride above the largest corner x, packing is exact and steps never wrap a row.
    """
    packed = points[:, 0].astype(np.int64) + stride * points[:, 1]
    prev, nxt = ring_index(bounds)
    row_step, column_step = np.divmod(packed - packed[prev] + stride + 1, stride)
    code = column_step + 3 * row_step  # (dx, dy) in row-major order of the 3x3 block
    key = 9 * code + code[nxt]
    count = _TURN_COUNT[key]
    ends = offsets(count)
    emitted = np.arange(ends[-1]) + np.repeat(_TURN_FIRST[key] - ends[:-1], count)
    corner = _TURN_CORNERS[:, 0] + stride * _TURN_CORNERS[:, 1]
    vertices = np.repeat(packed, count) + corner[emitted]
    bounds = ends[bounds]
    # Crack rings move in unit steps; only where the step changes is a corner.
    prev, nxt = ring_index(bounds)
    step = vertices - vertices[prev]
    turns = step != step[nxt]
    return vertices[turns], offsets(turns)[bounds]


def signed_areas(vertices: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Twice the shoelace area of each ring (exact for integer vertices)."""
    _, nxt = ring_index(bounds)
    x, y = vertices[:, 0], vertices[:, 1]
    return np.add.reduceat(x * y[nxt] - x[nxt] * y, bounds[:-1])


def offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each run of ``counts`` items, plus the total: ``[0, c0, c0 + c1, ...]``."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def ring_owner(bounds: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def from_list(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    bounds = offsets(np.array([len(r) for r in rings], np.int64))
    vertices = np.concatenate(rings) if rings else np.zeros((0, 2), np.int64)
    return vertices, bounds


def to_list(vertices: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    return np.split(vertices, bounds[1:-1])


class Rings(NamedTuple):
    """Open rings stored flat: ring k is ``vertices[bounds[k]:bounds[k + 1]]``.

    Ring k belongs to polygon ``polygon[k]`` (numbered from 0) and is one of its holes
    when ``is_hole[k]`` (negative signed area), else its exterior (positive).
    """

    vertices: np.ndarray
    bounds: np.ndarray
    polygon: np.ndarray
    is_hole: np.ndarray


def _split_touching(rings: Rings) -> Rings:
    """Make every ring simple: split rings that visit a (saddle) vertex twice.

    The two visits to a saddle never cross, so within a ring the visit pairs [first,
    second) nest like brackets. Each vertex goes to the innermost pair around it (or stays
    in its ring when none is), which cuts out inner loops first and leaves every loop
    simple. Loops keep their ring's polygon; a pocket split off an exterior turns the
    other way, so it becomes a hole touching that exterior at the saddle.
    """
    vertices, bounds, polygon, _ = rings
    owner = ring_owner(bounds)
    width, height = (int(v) + 1 for v in vertices.max(axis=0))
    key = (owner * height + vertices[:, 1]) * width + vertices[:, 0]
    order = np.argsort(key, kind="stable")
    twice = key[order[1:]] == key[order[:-1]]
    if not twice.any():
        return rings
    # The stable sort puts a vertex's first visit before its second; number the pairs in
    # order of their first visit.
    opens, closes = np.sort(order[:-1][twice]), order[1:][twice]
    size = len(vertices)
    depth = np.cumsum(np.bincount(opens, minlength=size) - np.bincount(closes, minlength=size))
    # The innermost pair around a vertex at depth d is the last pair opened at level d
    # before it: one search over pairs sorted by (level, position).
    by_level = np.sort(depth[opens] * size + opens)
    inside = np.flatnonzero(depth)
    innermost = by_level[np.searchsorted(by_level, depth[inside] * size + inside, "right") - 1]
    loop = owner.copy()
    loop[inside] = len(bounds) - 1 + np.searchsorted(opens, innermost % size)
    regrouped = np.argsort(loop, kind="stable")
    new_bounds = offsets(np.bincount(loop))
    new_vertices = vertices[regrouped]
    return Rings(
        new_vertices,
        new_bounds,
        np.concatenate([polygon, polygon[owner[opens]]]),
        signed_areas(new_vertices, new_bounds) < 0,
    )


def trace(binary: np.ndarray) -> Rings:
    """Exact rings of a non-empty uint8 mask."""
    background = cv2.compare(
        cv2.copyMakeBorder(binary, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), 0, cv2.CMP_EQ
    )
    contours, hierarchy = cv2.findContours(background, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    parent = hierarchy[0, :, 3]
    inner = np.flatnonzero(parent >= 0)  # the one root is the padding frame: not an object
    chains = [contours[i] for i in inner]
    stride = background.shape[1] + 1
    packed, bounds = _crack_rings(
        np.concatenate(chains).reshape(-1, 2),
        offsets(np.array([len(c) for c in chains], np.int64)),
        stride,
    )
    row, column = np.divmod(packed, stride)
    vertices = np.stack([column - 1, row - 1], axis=1)  # drop the padding
    # A contour enclosing foreground is an exterior; one enclosing background is a hole
    # of the polygon whose exterior contour it lies in (its parent in the tree).
    exterior = signed_areas(vertices, bounds) > 0
    number = np.zeros(len(parent), np.int64)
    number[inner[exterior]] = np.arange(np.count_nonzero(exterior))
    polygon = number[np.where(exterior, inner, parent[inner])]
    return _split_touching(Rings(vertices, bounds, polygon, ~exterior))
