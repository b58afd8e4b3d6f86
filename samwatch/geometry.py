"""Binary masks to GeoJSON geometry and QuPath-ready features.

This module knows nothing of models or files: it turns a 2-D mask into polygons, and
polygons into GeoJSON ``Feature``/``FeatureCollection`` objects that QuPath imports.

Conventions
-----------
Pixel corners
    Coordinates are pixels, x to the right, y down, origin at the top-left corner of the
    image. Pixel ``(x, y)`` covers the square ``[x, x+1] x [y, y+1]``, and every vertex lies
    on a pixel corner, as in QuPath's own contour tracing. A one-pixel object at ``(x, y)``
    is therefore the unit square ``[[x, y], [x+1, y], [x+1, y+1], [x, y+1], [x, y]]``, and
    filling the polygons by pixel centres (:func:`rasterize`) gives back exactly the mask.

Connectivity
    Foreground is 4-connected, background 8-connected. Each 4-connected part of the mask
    becomes one polygon, so pixels touching only at a corner are separate polygons of a
    MultiPolygon that touch at that single point. A background pocket closed off except at
    a corner is a hole of the polygon around it, touching its exterior at that point. Both
    are valid OGC/shapely geometry: every ring is simple (no vertex visited twice), rings
    touch only at isolated points, and each polygon's interior is connected.

Orientation
    RFC 7946 (right-hand rule) on the coordinates as written: exterior rings have positive
    shoelace area and holes negative, i.e. exteriors are counter-clockwise and holes
    clockwise when the numbers are plotted with y up (as GeoJSON tools and shapely's
    ``orient`` see them); on screen, with y down, exteriors appear clockwise. Each ring
    starts at its top-most, then left-most vertex.

Rings are closed (first == last), hold at least four positions, and keep only corners:
no repeated consecutive vertices, no collinear vertices along straight runs.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np

OBJECT_TYPES = ("annotation", "detection")

#: Simplification retries a polygon at tolerance, tolerance/2, tolerance/4, then exactly.
_SIMPLIFY_ATTEMPTS = 3

#: Upper bound on candidate segment pairs tested at once, to bound memory.
_PAIR_CHUNK = 1 << 21


# --------------------------------------------------------------------------- tracing
#
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
    offsets = np.array(table, np.int64)
    for array in (count, first, offsets):
        array.flags.writeable = False
    return count, first, offsets


_TURN_COUNT, _TURN_FIRST, _TURN_CORNERS = _step_turn_tables()


def _ring_index(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    prev, nxt = _ring_index(bounds)
    row_step, column_step = np.divmod(packed - packed[prev] + stride + 1, stride)
    code = column_step + 3 * row_step  # (dx, dy) in row-major order of the 3x3 block
    key = 9 * code + code[nxt]
    count = _TURN_COUNT[key]
    ends = _offsets(count)
    emitted = np.arange(ends[-1]) + np.repeat(_TURN_FIRST[key] - ends[:-1], count)
    corner = _TURN_CORNERS[:, 0] + stride * _TURN_CORNERS[:, 1]
    vertices = np.repeat(packed, count) + corner[emitted]
    bounds = ends[bounds]
    # Crack rings move in unit steps; only where the step changes is a corner.
    prev, nxt = _ring_index(bounds)
    step = vertices - vertices[prev]
    turns = step != step[nxt]
    return vertices[turns], _offsets(turns)[bounds]


def _signed_areas(vertices: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Twice the shoelace area of each ring (exact for integer vertices)."""
    _, nxt = _ring_index(bounds)
    x, y = vertices[:, 0], vertices[:, 1]
    return np.add.reduceat(x * y[nxt] - x[nxt] * y, bounds[:-1])


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each run of ``counts`` items, plus the total: ``[0, c0, c0 + c1, ...]``."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _ring_owner(bounds: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


def _from_list(rings: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    bounds = _offsets(np.array([len(r) for r in rings], np.int64))
    vertices = np.concatenate(rings) if rings else np.zeros((0, 2), np.int64)
    return vertices, bounds


def _to_list(vertices: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    return np.split(vertices, bounds[1:-1])


class _Rings(NamedTuple):
    """Open rings stored flat: ring k is ``vertices[bounds[k]:bounds[k + 1]]``.

    Ring k belongs to polygon ``polygon[k]`` (numbered from 0) and is one of its holes
    when ``is_hole[k]`` (negative signed area), else its exterior (positive).
    """

    vertices: np.ndarray
    bounds: np.ndarray
    polygon: np.ndarray
    is_hole: np.ndarray


def _split_touching(rings: _Rings) -> _Rings:
    """Make every ring simple: split rings that visit a (saddle) vertex twice.

    The two visits to a saddle never cross, so within a ring the visit pairs [first,
    second) nest like brackets. Each vertex goes to the innermost pair around it (or stays
    in its ring when none is), which cuts out inner loops first and leaves every loop
    simple. Loops keep their ring's polygon; a pocket split off an exterior turns the
    other way, so it becomes a hole touching that exterior at the saddle.
    """
    vertices, bounds, polygon, _ = rings
    owner = _ring_owner(bounds)
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
    new_bounds = _offsets(np.bincount(loop))
    new_vertices = vertices[regrouped]
    return _Rings(
        new_vertices,
        new_bounds,
        np.concatenate([polygon, polygon[owner[opens]]]),
        _signed_areas(new_vertices, new_bounds) < 0,
    )


def _trace(binary: np.ndarray) -> _Rings:
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
        _offsets(np.array([len(c) for c in chains], np.int64)),
        stride,
    )
    row, column = np.divmod(packed, stride)
    vertices = np.stack([column - 1, row - 1], axis=1)  # drop the padding
    # A contour enclosing foreground is an exterior; one enclosing background is a hole
    # of the polygon whose exterior contour it lies in (its parent in the tree).
    exterior = _signed_areas(vertices, bounds) > 0
    number = np.zeros(len(parent), np.int64)
    number[inner[exterior]] = np.arange(np.count_nonzero(exterior))
    polygon = number[np.where(exterior, inner, parent[inner])]
    return _split_touching(_Rings(vertices, bounds, polygon, ~exterior))


# ----------------------------------------------------------------------- simplification


def _simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray | None:
    """Douglas-Peucker on a closed ring; None when it collapses to a line or a point."""
    if tolerance <= 0:
        return ring
    kept = cv2.approxPolyDP(ring.astype(np.int32).reshape(-1, 1, 2), tolerance, True)
    kept = kept.reshape(-1, 2).astype(np.int64)
    if len(kept) < 3 or _signed_areas(kept, np.array([0, len(kept)]))[0] == 0:
        return None
    return kept


def _candidate_pairs(lo: np.ndarray, hi: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (i, j) of intervals [lo, hi] that overlap, by a sort-and-sweep.

    Yields chunks so that a geometry with very many overlapping edges cannot exhaust memory.
    """
    order = np.argsort(lo, kind="stable")
    end = np.searchsorted(lo[order], hi[order], side="right")
    counts = np.maximum(end - np.arange(len(order)) - 1, 0)
    cumulative = np.cumsum(counts)
    i = 0
    while i < len(order):
        stop = int(np.searchsorted(cumulative, cumulative[i] - counts[i] + _PAIR_CHUNK))
        stop = min(max(stop, i + 1), len(order))
        n = counts[i:stop]
        first = np.repeat(np.arange(i, stop), n)
        offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        yield order[first], order[first + 1 + offset]
        i = stop


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sign(
        (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    )


def _within_box(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Whether c lies in the bounding box of segment ab (c is collinear with it)."""
    return np.all((np.minimum(a, b) <= c) & (c <= np.maximum(a, b)), axis=1)


def _touching(p1: np.ndarray, q1: np.ndarray, p2: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Whether closed segments p1q1 and p2q2 share any point."""
    o1, o2 = _orient(p1, q1, p2), _orient(p1, q1, q2)
    o3, o4 = _orient(p2, q2, p1), _orient(p2, q2, q1)
    return (
        ((o1 * o2 < 0) & (o3 * o4 < 0))
        | ((o1 == 0) & _within_box(p1, q1, p2))
        | ((o2 == 0) & _within_box(p1, q1, q2))
        | ((o3 == 0) & _within_box(p2, q2, p1))
        | ((o4 == 0) & _within_box(p2, q2, q1))
    )


def _invalid_polygons(rings: _Rings, simplified: np.ndarray) -> np.ndarray:
    """Simplified polygons whose rings self-intersect, touch another ring or flipped over.

    ``rings.polygon`` indexes ``simplified``. Exact rings are valid by construction (they
    may touch at a saddle corner), so only pairs involving a simplified polygon are
    checked, and any contact at all counts: stricter than OGC, which is safe since such a
    polygon is just simplified less.
    """
    vertices, bounds, polygon, is_hole = rings
    flipped = (_signed_areas(vertices, bounds) > 0) == is_hole
    bad = [polygon[flipped & simplified[polygon]]]
    owner = _ring_owner(bounds)
    _, nxt = _ring_index(bounds)
    p, q = vertices, vertices[nxt]
    pos = np.arange(len(p)) - bounds[owner]
    length = np.diff(bounds)[owner]
    lo, hi = np.minimum(p, q), np.maximum(p, q)
    for i, j in _candidate_pairs(lo[:, 0], hi[:, 0]):
        keep = (lo[i, 1] <= hi[j, 1]) & (lo[j, 1] <= hi[i, 1])
        keep &= simplified[polygon[owner[i]]] | simplified[polygon[owner[j]]]
        i, j = i[keep], j[keep]
        gap = np.abs(pos[i] - pos[j])
        adjacent = (owner[i] == owner[j]) & ((gap == 1) | (gap == length[i] - 1))
        # Neighbouring edges share a vertex by design; they are only wrong when they fold
        # back onto each other (collinear, pointing apart).
        d1, d2 = q[i] - p[i], q[j] - p[j]
        folded = (d1[:, 0] * d2[:, 1] == d1[:, 1] * d2[:, 0]) & (np.sum(d1 * d2, axis=1) < 0)
        hit = np.where(adjacent, folded, _touching(p[i], q[i], p[j], q[j]))
        bad.append(polygon[owner[np.concatenate([i[hit], j[hit]])]])
    bad_polygons = np.unique(np.concatenate(bad))
    return bad_polygons[simplified[bad_polygons]]


def _simplify(rings: _Rings, tolerance: float) -> _Rings:
    """Simplify every polygon, backing off (down to exact) wherever validity would break."""
    exact = _to_list(rings.vertices, rings.bounds)
    polygon, is_hole = rings.polygon, rings.is_hole
    tolerances = np.full(polygon.max() + 1, float(tolerance))
    attempts = np.zeros(len(tolerances), np.int64)
    current = [_simplify_ring(r, tolerance) for r in exact]
    while True:
        collapsed = np.array([r is None for r in current], bool)
        lost = np.zeros(len(tolerances), bool)
        lost[polygon[collapsed & ~is_hole]] = True  # a polygon without exterior is gone
        keep = np.flatnonzero(~collapsed & ~lost[polygon])
        vertices, bounds = _from_list([current[k] for k in keep])
        candidate = _Rings(vertices, bounds, polygon[keep], is_hole[keep])
        if len(keep) == 0:
            return candidate
        bad = _invalid_polygons(candidate, tolerances > 0)
        if len(bad) == 0:
            return candidate
        attempts[bad] += 1
        tolerances[bad] = np.where(
            attempts[bad] < _SIMPLIFY_ATTEMPTS, tolerance / 2.0 ** attempts[bad], 0.0
        )
        for k in np.flatnonzero(np.isin(polygon, bad)):
            current[k] = _simplify_ring(exact[k], tolerances[polygon[k]])


# ------------------------------------------------------------------------------ public


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.view(np.uint8)
    if mask.dtype == np.uint8:
        return mask
    return (mask != 0).view(np.uint8)


def _geojson(rings: _Rings, offset: np.ndarray, scale: float = 1, *, arrays: bool = False) -> dict[str, Any]:
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
    closed = _offsets(n + 1)
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
    rings = _trace(binary[y : y + height, x : x + width])
    if simplify_tolerance > 0:
        rings = _simplify(rings, simplify_tolerance)
        if len(rings.polygon) == 0:
            return None
    dx, dy = offset
    if all(float(v).is_integer() for v in (dx, dy, scale)):
        scale = int(scale)
        return _geojson(rings, np.array([int(dx) + x * scale, int(dy) + y * scale]), scale, arrays=arrays)
    return _geojson(rings, np.array([dx + x * scale, dy + y * scale], np.float64), scale, arrays=arrays)


def _polygons_of(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
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
    rings = [np.asarray(ring, np.float64) for rings in _polygons_of(geometry) for ring in rings]
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


#: property -> its QuPath measurement name. QuPath's "Import objects" keeps only name, color,
#: classification, isLocked, measurements and metadata of a feature's properties, so scores
#: must also be measurements to survive the import (and be filterable there).
QUPATH_MEASUREMENTS = {
    "quality": "SAM quality",
    "stability_score": "SAM stability score",
    "object_idx": "SAM object index",
    "prompt_idx": "SAM prompt index",
    "mask_idx": "SAM mask index",
    "obj_id": "SAM object id",
    "frame": "SAM frame",
    "source_index": "SAM source index",
}


def qupath_measurements(properties: dict[str, Any]) -> dict[str, float]:
    return {
        name: value for key, name in QUPATH_MEASUREMENTS.items()
        if isinstance(value := properties.get(key), int | float) and not isinstance(value, bool)
    }


def make_feature(
    geometry: dict[str, Any],
    *,
    label: str,
    object_type: str = "annotation",
    color: list[int] | None = None,
    plane: dict[str, int] | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A GeoJSON Feature as QuPath imports it.

    ``plane`` (e.g. ``{"c": -1, "z": 0, "t": 3}``) goes inside the geometry, where QuPath
    and samapi put it. ``properties`` adds caller fields (object_idx, quality, ...); it may
    not redefine ``objectType`` or ``classification``, which come from the arguments. The
    scores and indices among them are repeated as QuPath ``measurements``, and a feature with
    a quality gets the ``name`` QuPath's SAM extension gives its objects.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    extra = dict(properties or {})
    clash = {"objectType", "classification"} & extra.keys()
    if clash:
        raise ValueError(f"properties may not set {sorted(clash)}; use the arguments")
    geometry = dict(geometry) if plane is None else {**geometry, "plane": dict(plane)}
    colour = class_color(label) if color is None else list(color)
    classification = {"name": label, "color": colour}
    measurements = qupath_measurements(extra)
    qupath: dict[str, Any] = {"measurements": measurements} if measurements else {}
    if "SAM quality" in measurements:
        qupath["name"] = f"SAM (Quality={extra['quality']:.2f})"
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": object_type, "classification": classification, **qupath, **extra},
    }


def feature_collection(features: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with samwatch's job metadata under ``"samwatch"``."""
    return {"type": "FeatureCollection", "features": list(features), "samwatch": meta}
