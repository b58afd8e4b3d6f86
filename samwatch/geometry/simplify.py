"""Douglas-Peucker simplification of traced rings that never breaks validity: a polygon whose
simplified rings would cross, touch or flip is simplified less, down to exact."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from samwatch.geometry.trace import Rings, from_list, ring_index, ring_owner, signed_areas, to_list

#: Simplification retries a polygon at tolerance, tolerance/2, tolerance/4, then exactly.
_SIMPLIFY_ATTEMPTS = 3

#: Upper bound on candidate segment pairs tested at once, to bound memory.
_PAIR_CHUNK = 1 << 21


def _simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray | None:
    """Douglas-Peucker on a closed ring; None when it collapses to a line or a point."""
    if tolerance <= 0:
        return ring
    kept = cv2.approxPolyDP(ring.astype(np.int32).reshape(-1, 1, 2), tolerance, True)
    kept = kept.reshape(-1, 2).astype(np.int64)
    if len(kept) < 3 or signed_areas(kept, np.array([0, len(kept)]))[0] == 0:
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


def _invalid_polygons(rings: Rings, simplified: np.ndarray) -> np.ndarray:
    """Simplified polygons whose rings self-intersect, touch another ring or flipped over.

    ``rings.polygon`` indexes ``simplified``. Exact rings are valid by construction (they
    may touch at a saddle corner), so only pairs involving a simplified polygon are
    checked, and any contact at all counts: stricter than OGC, which is safe since such a
    polygon is just simplified less.
    """
    vertices, bounds, polygon, is_hole = rings
    flipped = (signed_areas(vertices, bounds) > 0) == is_hole
    bad = [polygon[flipped & simplified[polygon]]]
    owner = ring_owner(bounds)
    _, nxt = ring_index(bounds)
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


def simplify(rings: Rings, tolerance: float) -> Rings:
    """Simplify every polygon, backing off (down to exact) wherever validity would break."""
    exact = to_list(rings.vertices, rings.bounds)
    polygon, is_hole = rings.polygon, rings.is_hole
    tolerances = np.full(polygon.max() + 1, float(tolerance))
    attempts = np.zeros(len(tolerances), np.int64)
    current = [_simplify_ring(r, tolerance) for r in exact]
    while True:
        collapsed = np.array([r is None for r in current], bool)
        lost = np.zeros(len(tolerances), bool)
        lost[polygon[collapsed & ~is_hole]] = True  # a polygon without exterior is gone
        keep = np.flatnonzero(~collapsed & ~lost[polygon])
        vertices, bounds = from_list([current[k] for k in keep])
        candidate = Rings(vertices, bounds, polygon[keep], is_hole[keep])
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
