"""Previews, label images and the result files that live and die with the GeoJSON."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from samwatch.config import OutputSettings
from samwatch.geometry.outline import mask_to_geometry
from samwatch.geometry.raster import polygons_of, rasterize
from samwatch.media.read import probe
from samwatch.control.outbox import LABELS_CSV_SUFFIX, LABELS_SUFFIX, PREVIEW_SUFFIX, JobOutputs
from samwatch.outputs.extras import OutputPlan, result_extras
from samwatch.outputs.labels import labels_csv, pyramid_factors, write_labels
from samwatch.outputs.preview import contact_planes, encode_png, render_preview
from samwatch.outputs.geojson import shape_feature
from samwatch.outputs.shapes import Shape, drawable
from samwatch.sidecars.schema import OutputSpec, validate_sidecar

RED, GREEN = (230, 30, 30), (30, 200, 40)


def disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r * r


def shape_of(geometry: dict, index: int = 0, *, object_idx: int | None = None, label: str = "cell", color=RED,
             quality: float = 0.9, frame: int | None = None) -> Shape:
    polygons = tuple(tuple(np.asarray(ring) for ring in polygon) for polygon in polygons_of(geometry))
    return Shape(polygons=polygons, name=label, color=color, object_idx=index if object_idx is None else object_idx,
                 index=index, quality=quality, model="vit_t", prompt_idx=index, frame=frame,
                 zt=None if frame is None else (0, frame))


def feature(mask: np.ndarray, index: int, **kwargs) -> Shape:  # noqa: ANN003
    return shape_of(mask_to_geometry(mask), index, **kwargs)


def ring_blob(shape: tuple[int, int]) -> np.ndarray:
    """A ring with a hole, plus a detached part: a MultiPolygon with an interior ring."""
    mask = disc(shape, 300, 250, 120) & ~disc(shape, 300, 250, 50)
    mask[40:90, 500:620] = True
    return mask


def segment_distances(points: np.ndarray, rings: list[np.ndarray]) -> np.ndarray:
    """Distance from each point to the nearest edge of any ring."""
    p = np.concatenate([r[:-1] for r in rings])
    q = np.concatenate([r[1:] for r in rings])
    d = q - p
    t = np.clip(((points[:, None, :] - p[None]) * d[None]).sum(-1) / (d * d).sum(-1)[None], 0, 1)
    nearest = p[None] + t[..., None] * d[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(-1)).min(axis=1)


# ----------------------------------------------------------------------------- preview


def test_preview_outlines_lie_on_the_polygon_boundaries_in_class_colours() -> None:
    shape = (900, 1200)
    masks = [ring_blob(shape), disc(shape, 900, 600, 150)]
    features = [feature(masks[0], 0, color=RED), feature(masks[1], 1, label="nucleus", color=GREEN)]
    shapes = features
    grey = np.full((*shape, 3), 120, np.uint8)
    preview = render_preview(shapes, lambda i: grey, width=shape[1], height=shape[0], size=400)
    assert preview.shape == (300, 400, 3)  # <= 400 a side, aspect kept
    scale = 400 / 1200
    for color, feat in ((RED, features[0]), (GREEN, features[1])):
        ys, xs = np.nonzero(np.all(preview == color, axis=-1))
        assert len(xs) > 100, f"class colour {color} not drawn"
        centres = np.stack([(xs + 0.5) / scale, (ys + 0.5) / scale], axis=1)
        rings = list(feat.rings)
        # Within one preview pixel (diagonal) of the true boundary, in image pixels.
        assert segment_distances(centres, rings).max() <= 1.5 / scale
    # Everything else is the untouched image (an outline, not a fill).
    drawn = np.all(preview == RED, axis=-1) | np.all(preview == GREEN, axis=-1)
    assert np.all(preview[~drawn] == 120)


def test_no_preview_for_an_empty_result_and_none_when_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(path)
    media = probe(path)
    sidecar = validate_sidecar({"prompts": [{"bbox": [1, 1, 10, 10]}]}, name="a.yaml")
    extras = result_extras([], media, sidecar, OutputPlan(preview=True, labels=True))
    assert PREVIEW_SUFFIX not in extras and {LABELS_SUFFIX, LABELS_CSV_SUFFIX} <= set(extras)
    one = [feature(disc((64, 80), 30, 30, 10), 0)]
    assert PREVIEW_SUFFIX in result_extras(one, media, sidecar, OutputPlan())
    assert result_extras(one, media, sidecar, OutputPlan(preview=False)) == {}


def test_output_plan_takes_the_sidecar_over_the_config() -> None:
    settings = OutputSettings(formats=["geojson", "labels"], preview=True, preview_size=512)
    assert OutputPlan.resolve(settings, OutputSpec()) == OutputPlan(preview=True, preview_size=512, labels=True)
    spec = OutputSpec(formats=["geojson"], preview=False, preview_size=256)
    assert OutputPlan.resolve(settings, spec) == OutputPlan(preview=False, preview_size=256, labels=False)


def test_automask_preview_fills_objects_semi_transparently() -> None:
    shape = (200, 200)
    shapes = [feature(disc(shape, 100, 100, 50), 0, color=RED)]
    grey = np.full((*shape, 3), 100, np.uint8)
    filled = render_preview(shapes, lambda i: grey, width=200, height=200, filled=True)
    inside = filled[100, 100].astype(int)
    assert inside[0] > 100 > inside[1] and inside[0] < RED[0], "blended, not opaque"
    assert np.all(filled[5, 5] == 100)


def test_stack_preview_is_a_contact_sheet_of_at_most_16_planes() -> None:
    assert contact_planes(5) == [0, 1, 2, 3, 4]
    planes = contact_planes(40)
    assert len(planes) == 16 and planes[0] == 0 and planes[-1] == 39
    shape = (100, 120)
    shapes = [feature(disc(shape, 60, 50, 30), 0, frame=0, color=RED),
              feature(disc(shape, 60, 50, 30), 1, frame=39, color=GREEN)]
    frames = []
    sheet = render_preview(shapes, lambda i: frames.append(i) or np.full((*shape, 3), 90, np.uint8),
                           width=120, height=100, n_frames=40, size=480)
    assert frames == planes  # only the planes shown are read
    assert sheet.shape == (4 * 100, 4 * 120, 3)
    first, last = sheet[:100, :120], sheet[300:, 360:]
    assert np.all(first == RED, axis=-1).any() and not np.all(first == GREEN, axis=-1).any()
    assert np.all(last == GREEN, axis=-1).any() and not np.all(last == RED, axis=-1).any()
    decoded = cv2.imdecode(np.frombuffer(encode_png(sheet), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(decoded, sheet)


# ----------------------------------------------------------------------------- labels


def expected_labels(features: list[Shape], shape: tuple[int, int], n_planes: int = 1) -> np.ndarray:
    """Each feature's rasterised GeoJSON, higher quality over lower, later over earlier."""
    out = np.zeros((n_planes, *shape), np.uint32)
    order = sorted(range(len(features)), key=lambda i: (features[i].quality, i))
    for i in order:
        encoded = shape_feature(features[i])
        props = encoded["properties"]
        out[props.get("frame", 0)][rasterize(encoded["geometry"], shape)] = props["object_idx"] + 1
    return out if n_planes > 1 else out[0]


def test_labels_read_back_equal_the_rasterised_geojson(tmp_path: Path) -> None:
    shape = (700, 900)  # not a multiple of the tile size
    rng = np.random.default_rng(3)
    masks = [ring_blob(shape)] + [disc(shape, *rng.uniform(50, 650, 2), rng.uniform(10, 120)) for _ in range(30)]
    masks.append(rng.random(shape) < 0.02)  # speckle: thousands of parts, as random weights give
    features = [feature(m, i, quality=float(rng.choice([0.5, 0.7, 0.9]))) for i, m in enumerate(masks)]
    path = tmp_path / "a.labels.tif"
    with path.open("wb") as handle:
        write_labels(handle, features, width=shape[1], height=shape[0])
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        labels = tif.asarray()
    assert labels.dtype == np.uint16 and labels.shape == shape
    np.testing.assert_array_equal(labels, expected_labels(features, shape))


def test_stack_labels_keep_planes_and_big_labels_use_uint32(tmp_path: Path) -> None:
    shape = (300, 260)
    features = [feature(disc(shape, 100, 100, 40), 0, frame=0), feature(disc(shape, 150, 120, 60), 1, object_idx=70000, frame=2),
                feature(disc(shape, 120, 110, 50), 2, object_idx=5, frame=2, quality=0.95)]
    path = tmp_path / "s.labels.tif"
    with path.open("wb") as handle:
        write_labels(handle, features, width=260, height=300, n_planes=3, plane_axis="Z")
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "ZYX"
        labels = tif.asarray()
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(labels, expected_labels(features, shape, 3))
    assert not labels[1].any()


def test_large_label_images_are_pyramidal(tmp_path: Path) -> None:
    width, height = 5000, 4300
    geometry = {"type": "Polygon", "coordinates": [[[100, 100], [4900, 300], [2500, 4200], [100, 100]]]}
    features = [shape_of(geometry, label="tissue", quality=1.0)]
    assert pyramid_factors(width, height) == [1, 2, 4, 8]
    path = tmp_path / "big.labels.tif"
    with path.open("wb") as handle:
        write_labels(handle, features, width=width, height=height)
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(4300, 5000), (2150, 2500), (1075, 1250), (538, 625)]
        np.testing.assert_array_equal(levels[0].asarray(), rasterize(geometry, (height, width)))
        coarse = levels[2].asarray()
    # A coarser level samples the same polygon at its own pixel centres.
    scaled = {"type": "Polygon", "coordinates": [[[x / 4, y / 4] for x, y in geometry["coordinates"][0]]]}
    np.testing.assert_array_equal(coarse, rasterize(scaled, coarse.shape))


def test_labels_csv_gives_class_score_and_prompt() -> None:
    shape = (50, 50)
    features = [feature(disc(shape, 20, 20, 8), 0, label="nucleus", quality=0.81),
                feature(disc(shape, 30, 30, 8), 1, label="cell, big", quality=0.5)]
    rows = list(csv.DictReader(io.StringIO(labels_csv(features, lambda i: f"prompt {i}").decode())))
    assert rows == [
        {"label": "1", "class": "nucleus", "score": "0.8100", "prompt_idx": "0", "prompt": "prompt 0", "planes": "1"},
        {"label": "2", "class": "cell, big", "score": "0.5000", "prompt_idx": "1", "prompt": "prompt 1", "planes": "1"},
    ]


def test_a_shape_is_written_as_the_feature_qupath_imports() -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]]}
    base = shape_of(square, 4, object_idx=7, label="cell", color=(1, 2, 3), quality=0.5, frame=2)
    shape = replace(base, mask_idx=1, obj_id=7, zt=(0, 2), object_type="detection",
                    extra={"stability_score": 0.25, "name": "from QuPath"})
    assert json.loads(json.dumps(shape_feature(shape), default=np.ndarray.tolist)) == {
        "type": "Feature",
        "geometry": {**square, "plane": {"c": -1, "z": 0, "t": 2}},
        "properties": {
            "objectType": "detection",
            "classification": {"name": "cell", "color": [1, 2, 3]},
            "measurements": {"SAM quality": 0.5, "SAM stability score": 0.25, "SAM object index": 7,
                             "SAM prompt index": 4, "SAM mask index": 1, "SAM object id": 7, "SAM frame": 2},
            "name": "from QuPath",  # a QuPath object's name is kept over "SAM (Quality=...)"
            "object_idx": 7, "prompt_idx": 4, "label": "cell", "quality": 0.5, "sam_model": "vit_t",
            "mask_idx": 1, "obj_id": 7, "frame": 2, "stability_score": 0.25,
        },
    }
    assert shape.label == 8 and shape.plane == 2
    assert replace(base, object_idx=-1).label == 5  # a negative video id: its position + 1
    sliver = replace(base, polygons=((np.array([[0, 0], [1, 1], [0, 0]]),),))
    assert drawable([sliver, base]) == [base]


# ----------------------------------------------------------------------------- the outbox


def test_extras_live_and_die_with_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = JobOutputs(tmp_path, "exp1/a")
    collection = {"type": "FeatureCollection", "features": []}
    outputs.done(collection, "1 feature", {PREVIEW_SUFFIX: b"png", LABELS_SUFFIX: b"t"})
    assert (tmp_path / "exp1/a.preview.png").read_bytes() == b"png" and (tmp_path / "exp1/a.labels.tif").exists()
    outputs.done(collection, "1 feature", {LABELS_SUFFIX: b"t2"})
    assert not (tmp_path / "exp1/a.preview.png").exists(), "a result without a preview keeps no stale one"
    outputs.failed({"error": "image_unreadable", "message": "m"}, 5, "m")
    assert sorted(p.name for p in (tmp_path / "exp1").iterdir()) == ["a.error.json", "a.progress.json"]

    import samwatch.control.outbox

    real = samwatch.control.outbox.stage_bytes

    def disk_full(path: Path, data: bytes, **kwargs) -> Path:  # noqa: ANN003
        if path.suffix == ".tif":
            raise OSError("disk full")
        return real(path, data, **kwargs)

    monkeypatch.setattr(samwatch.control.outbox, "stage_bytes", disk_full)
    with pytest.raises(OSError):
        outputs.done(collection, "m", {PREVIEW_SUFFIX: b"png", LABELS_SUFFIX: b"t"})
    assert sorted(p.name for p in (tmp_path / "exp1").iterdir()) == ["a.error.json", "a.progress.json"], \
        "no temporaries, no partial set"
    with pytest.raises(ValueError):
        outputs.done(collection, "m", {".other": b""})
    assert json.loads((tmp_path / "exp1/a.error.json").read_text())["error"] == "image_unreadable"
