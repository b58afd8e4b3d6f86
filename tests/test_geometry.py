"""Tests for samwatch.geometry: exact pixel-corner outlines, validity, features.

shapely is not a dependency, so validity is checked here from first principles; the
checks are stricter than OGC's (see ``assert_exact_valid``). When shapely happens to be
installed it is used as a second opinion.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage import data, filters

from samwatch.geometry.outline import mask_to_geometry
from samwatch.geometry.raster import iou, rasterize
from samwatch.outputs.geojson import feature_collection, make_feature
from samwatch.outputs.shapes import class_color

# ----------------------------------------------------------------------------- helpers


def polygons_of(geometry: dict) -> list:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def area2(ring: list) -> int:
    """Twice the shoelace area of a closed ring, on the coordinates as written."""
    r = np.asarray(ring)
    return int(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def unit_edges(ring: list) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The unit steps along an axis-aligned integer ring."""
    steps = []
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        n = abs(x1 - x0) + abs(y1 - y0)
        dx, dy = (x1 - x0) // n, (y1 - y0) // n
        points = [(x0 + k * dx, y0 + k * dy) for k in range(n + 1)]
        steps += list(itertools.pairwise(points))
    return steps


def assert_ring_shape(ring: list) -> None:
    assert len(ring) >= 4 and ring[0] == ring[-1]
    assert all(a != b for a, b in itertools.pairwise(ring)), "repeated consecutive vertex"
    assert len({tuple(v) for v in ring[:-1]}) == len(ring) - 1, "ring visits a vertex twice"


def assert_exact_valid(geometry: dict, shape: tuple[int, int]) -> None:
    """Exact geometry is valid: what OGC/shapely require, checked on the pixel lattice.

    Rings are simple, axis-aligned, corner-only and oriented (exterior > 0, holes < 0);
    no unit edge is shared by two rings (rings meet at isolated points only); each
    polygon is a 4-connected pixel set (connected interior) whose holes lie inside its
    exterior; polygons do not overlap.
    """
    seen_edges: set = set()
    cover = np.zeros(shape, np.int64)
    for rings in polygons_of(geometry):
        for k, ring in enumerate(rings):
            assert all(type(c) is int for v in ring for c in v)
            assert_ring_shape(ring)
            closed = ring + [ring[1]]
            for a, b, c in zip(closed, closed[1:], closed[2:]):
                d1 = (b[0] - a[0], b[1] - a[1])
                d2 = (c[0] - b[0], c[1] - b[1])
                assert 0 in d1 and 0 in d2, "edge not axis-aligned"
                assert d1[0] * d2[1] - d1[1] * d2[0] != 0, "collinear vertex kept"
            steps = unit_edges(ring)
            points = [s[0] for s in steps]
            assert len(set(points)) == len(points), "ring not simple"
            undirected = {frozenset(s) for s in steps}
            assert not undirected & seen_edges, "two rings share an edge"
            seen_edges |= undirected
            assert (area2(ring) > 0) == (k == 0), "wrong orientation"
        shell = rasterize({"type": "Polygon", "coordinates": rings[:1]}, shape)
        for hole in rings[1:]:
            inside = rasterize({"type": "Polygon", "coordinates": [hole]}, shape)
            assert np.all(shell[inside]), "hole outside its exterior"
        pixels = rasterize({"type": "Polygon", "coordinates": rings}, shape)
        count, _ = cv2.connectedComponents(pixels.view(np.uint8), connectivity=4)
        assert count == 2, "polygon interior is not connected"
        cover += pixels
    assert cover.max() <= 1, "polygons overlap"


def assert_round_trip(mask: np.ndarray) -> dict | None:
    geometry = mask_to_geometry(mask)
    if not mask.any():
        assert geometry is None
        return None
    assert_exact_valid(geometry, mask.shape)
    np.testing.assert_array_equal(rasterize(geometry, mask.shape), mask != 0)
    parts, _ = cv2.connectedComponents((mask != 0).astype(np.uint8), connectivity=4)
    assert len(polygons_of(geometry)) == parts - 1
    return geometry


def segments_cross(p1, q1, p2, q2) -> np.ndarray:
    """Whether closed segments p1q1 and p2q2 share a point (vectorised over rows)."""

    def orient(a, b, c):
        ab, ac = b - a, c - a
        return np.sign(ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0])

    def on(a, b, c):
        return np.all((np.minimum(a, b) <= c) & (c <= np.maximum(a, b)), axis=-1)

    o1, o2, o3, o4 = orient(p1, q1, p2), orient(p1, q1, q2), orient(p2, q2, p1), orient(p2, q2, q1)
    return (
        ((o1 * o2 < 0) & (o3 * o4 < 0))
        | ((o1 == 0) & on(p1, q1, p2))
        | ((o2 == 0) & on(p1, q1, q2))
        | ((o3 == 0) & on(p2, q2, p1))
        | ((o4 == 0) & on(p2, q2, q1))
    )


def ring_neighbours(ring: np.ndarray, vertex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directions from ``vertex`` to its two neighbours along a closed ring."""
    open_ring = ring[:-1]
    at = int(np.flatnonzero(np.all(open_ring == vertex, axis=1))[0])
    return open_ring[at - 1] - vertex, open_ring[(at + 1) % len(open_ring)] - vertex


def crosses_at(ring_a: np.ndarray, ring_b: np.ndarray, vertex: np.ndarray) -> bool:
    """Whether ring_b passes through ring_a at a shared vertex (rather than touching it)."""
    a1, a2 = (np.arctan2(d[1], d[0]) for d in ring_neighbours(ring_a, vertex))
    b1, b2 = (np.arctan2(d[1], d[0]) for d in ring_neighbours(ring_b, vertex))

    def in_arc(angle: float) -> bool:
        return (angle - a1) % (2 * np.pi) < (a2 - a1) % (2 * np.pi)

    return in_arc(b1) != in_arc(b2)


def assert_simplified_valid(geometry: dict) -> None:
    """OGC validity of any polygonal geometry, by brute force over segment pairs.

    Rings are simple and keep their orientation; two rings may meet only at a vertex of
    both, without crossing there or running along each other.
    """
    rings, segments = [], []
    for polygon in polygons_of(geometry):
        for k, ring in enumerate(polygon):
            assert_ring_shape(ring)
            assert (area2(ring) > 0) == (k == 0)
            rings.append(np.asarray(ring, np.int64))
            segments += [(len(rings) - 1, i, len(ring) - 1) for i in range(len(ring) - 1)]
    ring_id, pos, length = (np.array(column) for column in zip(*segments))
    p = np.concatenate([r[:-1] for r in rings])
    q = np.concatenate([r[1:] for r in rings])
    i, j = np.triu_indices(len(segments), 1)
    gap = np.abs(pos[i] - pos[j])
    adjacent = (ring_id[i] == ring_id[j]) & ((gap == 1) | (gap == length[i] - 1))
    hit = segments_cross(p[i], q[i], p[j], q[j]) & ~adjacent
    for a, b in zip(i[hit], j[hit]):
        assert ring_id[a] != ring_id[b], "ring touches itself"
        shared = [v for v in (p[a], q[a]) if any(np.array_equal(v, w) for w in (p[b], q[b]))]
        assert shared, "rings cross or touch away from a common vertex"
        v = shared[0]
        da = (q[a] if np.array_equal(p[a], v) else p[a]) - v
        db = (q[b] if np.array_equal(p[b], v) else p[b]) - v
        parallel = da[0] * db[1] == da[1] * db[0]
        assert not (parallel and np.dot(da, db) > 0), "rings run along each other"
        assert not crosses_at(rings[ring_id[a]], rings[ring_id[b]], v), "rings cross"


def vertex_count(geometry: dict) -> int:
    return sum(len(r) - 1 for rings in polygons_of(geometry) for r in rings)


def otsu(image: np.ndarray) -> np.ndarray:
    return image > filters.threshold_otsu(image)


def blobs(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return filters.gaussian(rng.standard_normal(shape), sigma) > 0.02


# ----------------------------------------------------------------------- basic shapes


def test_empty_mask_is_none() -> None:
    assert mask_to_geometry(np.zeros((7, 5), bool)) is None


def test_one_pixel_is_unit_square() -> None:
    mask = np.zeros((5, 6), bool)
    mask[2, 3] = True
    assert mask_to_geometry(mask) == {
        "type": "Polygon",
        "coordinates": [[[3, 2], [4, 2], [4, 3], [3, 3], [3, 2]]],
    }


def test_rectangle_has_four_corners() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 1:8] = 255
    geometry = mask_to_geometry(mask)
    assert geometry == {
        "type": "Polygon",
        "coordinates": [[[1, 2], [8, 2], [8, 5], [1, 5], [1, 2]]],
    }
    assert all(type(c) is int for v in geometry["coordinates"][0] for c in v)


def test_l_shape() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0:3, 0] = True
    mask[2, 0:3] = True
    assert mask_to_geometry(mask)["coordinates"] == [
        [[0, 0], [1, 0], [1, 2], [3, 2], [3, 3], [0, 3], [0, 0]]
    ]
    assert_round_trip(mask)


def test_ring_with_hole_is_one_polygon_with_two_rings() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    mask[2:4, 2:4] = False
    geometry = assert_round_trip(mask)
    assert geometry == {
        "type": "Polygon",
        "coordinates": [
            [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]],
            [[2, 2], [2, 4], [4, 4], [4, 2], [2, 2]],
        ],
    }


def test_orientation_exterior_positive_holes_negative() -> None:
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[2, 2] = mask[5:7, 4:7] = False
    exterior, *holes = mask_to_geometry(mask)["coordinates"]
    assert area2(exterior) > 0
    assert len(holes) == 2 and all(area2(h) < 0 for h in holes)
    # Starts at the top-most, then left-most vertex.
    assert exterior[0] == [1, 1] and holes[0][0] == [2, 2] and holes[1][0] == [4, 5]


def test_two_blobs_make_a_multipolygon() -> None:
    mask = np.zeros((8, 10), bool)
    mask[1:3, 1:3] = True
    mask[4:7, 5:9] = True
    geometry = assert_round_trip(mask)
    assert geometry == {
        "type": "MultiPolygon",
        "coordinates": [
            [[[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]],
            [[[5, 4], [9, 4], [9, 7], [5, 7], [5, 4]]],
        ],
    }


def test_diagonal_pixels_are_separate_polygons_touching_at_a_corner() -> None:
    geometry = assert_round_trip(np.array([[1, 0], [0, 1]], bool))
    assert geometry == {
        "type": "MultiPolygon",
        "coordinates": [
            [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]],
            [[[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]]],
        ],
    }
    anti = assert_round_trip(np.array([[0, 1], [1, 0]], bool))
    assert anti["type"] == "MultiPolygon" and len(anti["coordinates"]) == 2


def test_pocket_closed_at_a_corner_is_a_hole_touching_the_exterior() -> None:
    # The background pixel at (1, 1) reaches the outside only through the corner (2, 2).
    mask = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], bool)
    geometry = assert_round_trip(mask)
    assert geometry["type"] == "Polygon"
    exterior, hole = geometry["coordinates"]
    assert hole == [[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]]
    assert [2, 2] in exterior


@pytest.mark.parametrize("size", [3, 4, 9, 16])
def test_checkerboards(size: int) -> None:
    mask = (np.indices((size, size)).sum(axis=0) % 2).astype(bool)
    geometry = assert_round_trip(mask)
    assert len(polygons_of(geometry)) == mask.sum()
    assert_round_trip(~mask)


def test_objects_touching_the_image_border() -> None:
    full = np.ones((4, 5), bool)
    assert mask_to_geometry(full)["coordinates"] == [[[0, 0], [5, 0], [5, 4], [0, 4], [0, 0]]]
    frame = full.copy()
    frame[1:-1, 1:-1] = False
    assert len(assert_round_trip(frame)["coordinates"]) == 2
    corners = np.zeros((6, 7), bool)
    corners[0, 0] = corners[0, -1] = corners[-1, 0] = corners[-1, -1] = True
    corners[2:4, 0] = corners[2:4, -1] = corners[0, 3] = corners[-1, 3] = True
    assert len(assert_round_trip(corners)["coordinates"]) == 8


def test_every_3x3_mask_round_trips() -> None:
    for bits in range(512):
        assert_round_trip(((bits >> np.arange(9)) & 1).reshape(3, 3).astype(bool))


def test_random_masks_round_trip() -> None:
    rng = np.random.default_rng(20240601)
    for density in np.linspace(0.05, 0.95, 10):
        for _ in range(20):
            assert_round_trip(rng.random((20, 20)) < density)


def test_blurred_blobs_round_trip() -> None:
    rng = np.random.default_rng(7)
    for sigma in (1.0, 2.0, 4.0):
        for shape in ((64, 64), (50, 90)):
            assert_round_trip(blobs(rng, shape, sigma))


@pytest.mark.parametrize(
    "mask",
    [
        otsu(data.coins()),
        otsu(data.camera()),
        ~data.horse(),
        otsu(data.cell()),
        ~otsu(data.page()),
    ],
    ids=["coins", "camera", "horse", "cell", "page"],
)
def test_real_images_round_trip(mask: np.ndarray) -> None:
    geometry = mask_to_geometry(mask)
    np.testing.assert_array_equal(rasterize(geometry, mask.shape), mask)
    for rings in polygons_of(geometry):
        for k, ring in enumerate(rings):
            assert_ring_shape(ring)
            assert (area2(ring) > 0) == (k == 0)


def test_exact_validity_on_a_real_image() -> None:
    assert_round_trip(otsu(data.coins())[100:200, 0:160])


def test_accepts_other_dtypes_and_strided_views() -> None:
    mask = np.zeros((12, 14), bool)
    mask[3:9, 2:6] = True
    mask[5, 8:12] = True
    expected = mask_to_geometry(mask)
    assert mask_to_geometry(mask.astype(np.float32) * 0.5) == expected
    assert mask_to_geometry(mask.astype(np.int64) * 7) == expected
    big = np.zeros((24, 28), bool)
    big[::2, ::2] = mask
    assert mask_to_geometry(big[::2, ::2]) == expected
    assert_round_trip(np.ascontiguousarray(mask.T)[:, :])
    assert_round_trip(mask.T)


def test_rejects_non_2d_masks() -> None:
    with pytest.raises(ValueError):
        mask_to_geometry(np.zeros((2, 3, 4), bool))


def test_offset_is_added_and_keeps_ints_when_integral() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True
    shifted = mask_to_geometry(mask, offset=(100, 50))
    assert shifted["coordinates"][0][0] == [102, 51]
    assert all(type(c) is int for v in shifted["coordinates"][0] for c in v)
    fractional = mask_to_geometry(mask, offset=(0.5, -1.25))
    assert fractional["coordinates"][0][:2] == [[2.5, -0.25], [3.5, -0.25]]



@pytest.mark.parametrize(("offset", "scale"), [((0, 0), 1.0), ((100, 50), 2.0), ((0.5, -1.25), 0.25)])
def test_array_rings_equal_list_rings(offset: tuple[float, float], scale: float) -> None:
    import orjson

    mask = filters.gaussian(np.random.default_rng(5).random((96, 80)), 2) > 0.5  # holes, several parts
    listed = mask_to_geometry(mask, offset=offset, scale=scale)
    arrays = mask_to_geometry(mask, offset=offset, scale=scale, arrays=True)
    assert listed["type"] == arrays["type"] == "MultiPolygon"
    rings = [ring for polygon in arrays["coordinates"] for ring in polygon]
    assert all(isinstance(ring, np.ndarray) and ring.flags.c_contiguous for ring in rings)
    assert orjson.loads(orjson.dumps(arrays, option=orjson.OPT_SERIALIZE_NUMPY)) == listed


# ---------------------------------------------------------------------- simplification


@pytest.mark.parametrize(("tolerance", "min_iou"), [(0.5, 0.95), (1.0, 0.9), (3.0, 0.75)])
def test_simplify_reduces_vertices_and_keeps_validity(tolerance: float, min_iou: float) -> None:
    rng = np.random.default_rng(3)
    for mask in (otsu(data.coins())[60:260, 0:200], blobs(rng, (120, 120), 3.0)):
        exact = mask_to_geometry(mask)
        simple = mask_to_geometry(mask, simplify_tolerance=tolerance)
        assert vertex_count(simple) < vertex_count(exact)
        assert_simplified_valid(simple)
        assert iou(rasterize(simple, mask.shape), mask) > min_iou


def test_simplify_keeps_validity_on_noise() -> None:
    # Narrow, diagonal-touching parts are where naive simplification crosses rings.
    rng = np.random.default_rng(11)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((40, 40)) < density
        geometry = mask_to_geometry(mask, simplify_tolerance=1.5)
        if geometry is not None:
            assert_simplified_valid(geometry)


def test_simplify_drops_collapsed_rings() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[20, 20] = False  # a one-pixel hole
    mask[1, 38] = True  # a one-pixel speck
    geometry = mask_to_geometry(mask, simplify_tolerance=2.0)
    assert geometry == {
        "type": "Polygon",
        "coordinates": [[[5, 5], [35, 5], [35, 35], [5, 35], [5, 5]]],
    }
    speck = np.zeros((5, 5), bool)
    speck[2, 2] = True
    assert mask_to_geometry(speck, simplify_tolerance=2.0) is None


def test_zero_tolerance_keeps_every_corner() -> None:
    mask = otsu(data.coins())[0:120, 0:120]
    assert mask_to_geometry(mask, simplify_tolerance=0.0) == mask_to_geometry(mask)


def test_shapely_agrees_when_installed() -> None:
    shapely_geometry = pytest.importorskip("shapely.geometry")
    rng = np.random.default_rng(5)
    for mask in [rng.random((20, 20)) < 0.5, otsu(data.coins())]:
        for tolerance in (0.0, 1.5):
            geometry = mask_to_geometry(mask, simplify_tolerance=tolerance)
            shape = shapely_geometry.shape(geometry)
            assert shape.is_valid
            if tolerance == 0:
                assert shape.area == mask.sum()


# ---------------------------------------------------------------------- rasterize / iou


def test_rasterize_uses_pixel_centres_for_arbitrary_polygons() -> None:
    triangle = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [0, 4], [0, 0]]]}
    # Centres on the hypotenuse (x + y == 4) count as outside.
    expected = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(rasterize(triangle, (4, 4)), expected)
    outside = {"type": "Polygon", "coordinates": [[[-3, -3], [10, -3], [10, 1], [-3, 1], [-3, -3]]]}
    np.testing.assert_array_equal(rasterize(outside, (2, 3)), [[1, 1, 1], [0, 0, 0]])


def test_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert iou(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(a, a) == 1.0
    with pytest.raises(ValueError):
        iou(a, np.zeros((3, 3), bool))


# ---------------------------------------------------------------------- features


def test_class_color_is_stable_across_processes() -> None:
    assert class_color("Tumor") == [41, 233, 37]
    code = "import json, samwatch.outputs.shapes as g; print(json.dumps(g.class_color('Tumor')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == class_color("Tumor")
    colours = {tuple(class_color(n)) for n in ("Tumor", "Stroma", "Immune cells", "", "a")}
    assert len(colours) == 5
    assert all(0 <= c <= 255 and type(c) is int for col in colours for c in col)


def test_make_feature_puts_plane_in_geometry_and_colour_in_classification() -> None:
    geometry = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    feature = make_feature(
        geometry,
        label="cell",
        object_type="detection",
        plane={"c": -1, "z": 0, "t": 3},
        properties={"object_idx": 2, "quality": 0.9},
    )
    assert feature == {
        "type": "Feature",
        "geometry": {**geometry, "plane": {"c": -1, "z": 0, "t": 3}},
        "properties": {
            "objectType": "detection",
            "classification": {"name": "cell", "color": class_color("cell")},
            "name": "SAM (Quality=0.90)",
            "measurements": {"SAM quality": 0.9, "SAM object index": 2},
            "object_idx": 2,
            "quality": 0.9,
        },
    }
    assert "plane" not in geometry
    plain = make_feature(geometry, label="x", color=[1, 2, 3])
    assert plain["properties"] == {
        "objectType": "annotation",
        "classification": {"name": "x", "color": [1, 2, 3]},
    }
    assert "plane" not in plain["geometry"]
    json.dumps(feature)


def test_make_feature_rejects_bad_arguments() -> None:
    geometry = {"type": "Polygon", "coordinates": []}
    with pytest.raises(ValueError):
        make_feature(geometry, label="x", object_type="cell")
    with pytest.raises(ValueError):
        make_feature(geometry, label="x", properties={"classification": {}})


def test_feature_collection() -> None:
    feature = make_feature(mask_to_geometry(np.ones((2, 2), bool)), label="a")
    collection = feature_collection([feature], {"job": "j1"})
    assert collection == {
        "type": "FeatureCollection",
        "features": [feature],
        "samwatch": {"job": "j1"},
    }
    json.dumps(collection)
