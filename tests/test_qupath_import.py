"""QuPath annotations in, refined objects out: exports dropped beside their images, through the
daemon in-process (``run --once``), with the fake model for the plumbing and a random-weight
MobileSAM against upstream's SamPredictor for what the prompts are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from qupath_exports import (
    feature_02,
    feature_04,
    line,
    multipoint,
    polygon,
    rectangle,
    signed_rgb,
    write_array,
    write_collection,
)
from support import coins, fake_weights, read_json, save_image, write_sidecar

import fakes
from samwatch.config import Config
from samwatch.control.daemon import Daemon
from samwatch.geometry.raster import iou, rasterize

SMALL = np.full((120, 160, 3), 90, np.uint8)


def config_for(root: Path, weights: list[dict], **overrides) -> Config:
    body = {
        "inbox": root / "inbox", "outbox": root / "outbox", "state_dir": root / "state", "device": "cpu",
        "watch": {"mode": "polling", "settle_seconds": 0.0, "poll_interval_seconds": 0.05},
        "service": {"instance": "qupath", "heartbeat_seconds": 5.0}, "weights": weights,
        "models": {"accelerate": {"cpu": []}}, "output": {"preview": False}, **overrides,
    }
    config = Config.model_validate(body)
    for folder in (config.inbox, config.outbox, config.state_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return config


def run_once(config: Config, adapters=fakes.fake_adapters) -> None:  # noqa: ANN001
    """One in-process pass of the daemon; ``adapters``: the families table (None: the real models)."""
    Daemon.from_config(config, threaded=False, adapters=adapters).run_once()


def outcome(config: Config, stem: str) -> tuple[dict | None, dict | None]:
    return read_json(config.outbox / f"{stem}.geojson"), read_json(config.outbox / f"{stem}.error.json")


def by_source(result: dict) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for feature in result["features"]:
        found.setdefault(feature["properties"]["source_index"], []).append(feature)
    return found


# ---- the plumbing (fake model: a box prompt gives its box filled) --------------------------------


def test_a_04_export_beside_its_image_is_a_job_and_keeps_classes_names_and_ids(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "case17.png", SMALL)
    features = [
        feature_04(rectangle(10, 10, 40, 30), "Tumor", [200, 0, 0], name="gland 1", id="aaaa-1"),
        feature_04(polygon([[60, 20], [90, 15], [100, 50], [70, 60]]), "Stroma", [0, 150, 0], id="bbbb-2"),
        feature_04(multipoint([[20, 90]]), "Ignore*", [180, 180, 180]),  # background, never an object
        feature_04(rectangle(110, 70, 150, 110), "Cell", object_type="detection"),  # skipped by default
    ]
    write_collection(config.inbox / "case17.geojson", features)
    (config.inbox / "samwatch.yaml").write_text(yaml.safe_dump({"output": {"object_type": "detection"}}))
    run_once(config)
    result, error = outcome(config, "case17")
    assert error is None, error
    found = by_source(result)
    assert sorted(found) == [0, 1]
    first, second = found[0][0]["properties"], found[1][0]["properties"]
    assert first["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert second["classification"] == {"name": "Stroma", "color": [0, 150, 0]}
    assert first["name"] == "gland 1" and first["source_id"] == "aaaa-1" and second["source_id"] == "bbbb-2"
    assert first["metadata"] == {"source_file": "case17.geojson", "source_index": "0", "source_id": "aaaa-1"}
    assert first["measurements"]["SAM source index"] == 0
    assert {f["properties"]["objectType"] for f in result["features"]} == {"detection"}  # folder defaults' output
    # The fake fills the box: a polygon's prompt is the box of its bounds.
    assert rasterize(found[1][0]["geometry"], (120, 160))[15:60, 60:100].all()
    report = result["samwatch"]["annotations"]
    assert report["features"] == 4 and report["prompts"] == 2 and report["background_points"] == 1
    assert report["skipped"] == {"detection": 1} and report["warnings"] == []
    assert "prompts" not in result["samwatch"]["parameters"]  # the export is not repeated in the result


def test_a_02_bare_array_with_signed_colours_and_no_ids(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path), output={"preview": False, "object_type": "detection"})
    save_image(config.inbox / "old.png", SMALL)
    write_array(config.inbox / "old.geojson", [
        feature_02(rectangle(5, 5, 50, 50), "Tumor", signed_rgb(200, 10, 20)),
        feature_02(rectangle(60, 60, 100, 100)),  # unclassified: the default label
        feature_02(rectangle(0, 0, 160, 120), java_class="PathCellObject"),
    ])
    run_once(config)
    result, error = outcome(config, "old")
    assert error is None, error
    found = by_source(result)
    assert sorted(found) == [0, 1]
    assert found[0][0]["properties"]["classification"] == {"name": "Tumor", "color": [200, 10, 20]}
    assert found[1][0]["properties"]["classification"]["name"] == "object"
    assert all("source_id" not in f["properties"] for f in result["features"])  # 0.2 ids are class names
    assert result["samwatch"]["annotations"]["skipped"] == {"cell": 1}
    assert {f["properties"]["objectType"] for f in result["features"]} == {"detection"}  # the config's output


def test_detections_and_cells_are_prompts_when_asked_and_a_sidecar_adds_settings(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "s.png", SMALL)
    write_collection(config.inbox / "exports" / "all.geojson", [
        feature_04(rectangle(5, 5, 50, 50), "Tumor"),
        feature_04(rectangle(60, 60, 100, 100), "Cell", object_type="cell"),
    ])
    write_sidecar(config.inbox / "s.yaml", {
        "annotations": {"file": "exports/all.geojson", "object_types": ["annotation", "cell"]},
        "output_type": "Multi-mask (all)",
    })
    run_once(config)
    result, error = outcome(config, "s")
    assert error is None, error
    assert sorted(by_source(result)) == [0, 1]
    assert not (config.outbox / "exports" / "all.geojson").exists()  # named by a sidecar: no job of its own


def test_a_changed_export_runs_its_job_again(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "a.png", SMALL)
    write_sidecar(config.inbox / "a.yaml", {"annotations": "a.export.geojson"})
    export = write_collection(config.inbox / "a.export.geojson", [feature_04(rectangle(5, 5, 50, 50), "A")])
    run_once(config)
    assert len(outcome(config, "a")[0]["features"]) == 1
    write_collection(export, [feature_04(rectangle(5, 5, 50, 50), "A"), feature_04(rectangle(60, 60, 90, 90), "B")])
    run_once(config)
    result, error = outcome(config, "a")
    assert error is None and len(result["features"]) == 2
    assert not (config.outbox / "a.export.geojson").exists()


def test_a_geojson_with_no_image_of_its_stem_is_no_job(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "a.png", SMALL)
    write_collection(config.inbox / "notes.geojson", [feature_04(rectangle(5, 5, 50, 50))])
    run_once(config)
    assert not list(config.outbox.glob("notes.*"))


def test_an_outbox_inside_the_inbox_never_refines_its_own_results(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path), outbox=tmp_path / "inbox")
    save_image(config.inbox / "a.png", SMALL)
    write_sidecar(config.inbox / "a.yaml", {"prompts": [{"bbox": [5, 5, 50, 50]}]})
    run_once(config)
    run_once(config)
    assert read_json(config.inbox / "a.geojson")["samwatch"]["sidecar"] == "a.yaml"


# ---- bad input ---------------------------------------------------------------------------------


def test_an_export_that_is_not_geojson_fails_with_its_code(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    for stem, text in (("broken", "{not json"), ("other", json.dumps({"type": "Topology"}))):
        save_image(config.inbox / f"{stem}.png", SMALL)
        (config.inbox / f"{stem}.geojson").write_text(text)
    run_once(config)
    for stem in ("broken", "other"):
        result, error = outcome(config, stem)
        assert result is None and error["error"] == "annotations_invalid", error
        assert error["file"] == f"{stem}.geojson"


def test_bad_features_are_listed_and_the_rest_of_the_export_runs(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "b.png", SMALL)
    features = [
        feature_04(rectangle(5, 5, 50, 50), "Good", id="good"),
        feature_04(None, id="no-geometry"),
        feature_04({"type": "Polygon", "coordinates": []}, id="empty"),
        feature_04(rectangle(500, 500, 600, 600), id="outside"),
        feature_04({"type": "GeometryCollection", "geometries": []}, id="collection"),
        feature_04(rectangle(140, 100, 400, 400), "Edge", id="edge"),  # partly outside: cut to the image
    ]
    write_collection(config.inbox / "b.geojson", features)
    run_once(config)
    result, error = outcome(config, "b")
    assert error is None, error
    assert sorted(by_source(result)) == [0, 5]
    warnings = result["samwatch"]["annotations"]["warnings"]
    assert [(w["index"], w["id"], w["code"]) for w in warnings] == [
        (1, "no-geometry", "annotation_invalid"), (2, "empty", "annotation_invalid"),
        (3, "outside", "prompt_out_of_bounds"), (4, "collection", "annotation_invalid"),
    ]


def test_strict_fails_on_the_first_bad_feature_naming_its_index_and_id(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "c.png", SMALL)
    write_collection(config.inbox / "c.export.geojson",
                     [feature_04(rectangle(5, 5, 50, 50)), feature_04({"type": "Polygon", "coordinates": []}, id="x1")])
    write_sidecar(config.inbox / "c.yaml", {"annotations": {"file": "c.export.geojson", "strict": True}})
    run_once(config)
    result, error = outcome(config, "c")
    assert result is None and error["error"] == "annotation_invalid"
    assert error["index"] == 1 and error["id"] == "x1" and error["field"] == "features.1"


def test_an_export_with_nothing_to_refine_fails(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "d.png", SMALL)
    write_collection(config.inbox / "d.geojson", [feature_04(multipoint([[5, 5]]), "Ignore*"),
                                                  feature_04(rectangle(1, 1, 9, 9), object_type="detection")])
    run_once(config)
    result, error = outcome(config, "d")
    assert result is None and error["error"] == "annotations_empty", error


def test_an_export_of_200000_objects_is_refused_by_the_limit(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "e.png", SMALL)
    cell = {"type": "Feature", "id": "PathDetectionObject", "geometry": rectangle(1, 1, 3, 3), "properties": {}}
    (config.inbox / "e.geojson").write_text(json.dumps([cell] * 200_000))
    run_once(config)
    result, error = outcome(config, "e")
    assert result is None and error["error"] == "annotations_too_large"
    assert "limits.max_annotations (100000)" in error["message"]


def test_images_under_image_roots_are_read_in_place_and_others_stay_outside(tmp_path) -> None:
    store = tmp_path / "store"
    save_image(store / "slide1.png", SMALL)
    save_image(tmp_path / "elsewhere" / "x.png", SMALL)
    config = config_for(tmp_path, fake_weights(tmp_path), inputs={"image_roots": [store], "after": "move"})
    write_collection(config.inbox / "slide1.export.geojson", [feature_04(rectangle(5, 5, 50, 50), "T")])
    write_sidecar(config.inbox / "slide1.yaml", {"image": str(store / "slide1.png"), "annotations": "slide1.export.geojson"})
    write_sidecar(config.inbox / "x.yaml", {"image": str(tmp_path / "elsewhere" / "x.png"), "prompts": [{"bbox": [1, 1, 5, 5]}]})
    (store / "escape.png").symlink_to(tmp_path / "elsewhere" / "x.png")  # a link in the store leading out of it
    write_sidecar(config.inbox / "y.yaml", {"image": str(store / "escape.png"), "prompts": [{"bbox": [1, 1, 5, 5]}]})
    before = sorted(p.name for p in store.iterdir())
    run_once(config)
    result = read_json(config.outbox / "slide1.geojson")
    assert result is not None and len(result["features"]) == 1
    assert result["samwatch"]["image"]["path"] == str((store / "slide1.png").resolve())
    assert sorted(p.name for p in store.iterdir()) == before  # nothing written, moved or deleted there
    assert (config.inbox / "_done" / "slide1.yaml").exists()  # inputs.after: move moved the inbox's files only
    assert read_json(config.outbox / "x.error.json")["error"] == "path_outside_inbox"
    assert read_json(config.outbox / "y.error.json")["error"] == "path_outside_inbox"


# ---- real MobileSAM, random weights: the prompts are upstream's ---------------------------------


def _predictor(checkpoint: Path, image: np.ndarray):
    from samwatch.models.sam1 import build_predictor

    predictor = build_predictor("vit_t", None)
    predictor.model.load_state_dict(torch.load(checkpoint, weights_only=True))
    predictor.set_image(image)
    return predictor


def test_refined_objects_equal_upstreams_box_and_point_prompts(tmp_path, conditioned_vit_t) -> None:
    """0.4 collection and 0.2 array on coins: one feature per rectangle/polygon equal to
    SamPredictor's box prompt, a point annotation one object, a line its vertices, Ignore* points
    none of their own."""
    config = config_for(tmp_path, [{"name": "default", "type": "vit_t", "path": str(conditioned_vit_t)}])
    image = np.stack([coins()] * 3, axis=-1)
    for stem in ("new", "old"):
        save_image(config.inbox / f"{stem}.png", coins())
    boxes = [(20, 15, 95, 90), (170, 10, 250, 85)]
    poly = [[240, 90], [300, 95], [310, 160], [235, 150]]
    point, background = [[60, 130]], [[30, 160]]
    vertices = [[40, 40], [60, 55], [75, 70]]
    write_collection(config.inbox / "new.geojson", [
        feature_04(rectangle(*boxes[0]), "silver", [190, 190, 200], id="r0"),
        feature_04(rectangle(*boxes[1]), "bronze", [180, 110, 40], id="r1"),
        feature_04(polygon(poly), "worn", [90, 90, 90], id="p2"),
        feature_04(multipoint(point), "coin", [10, 200, 10], id="m3"),
        feature_04(multipoint(background), "Ignore*", [120, 120, 120], id="i4"),
        feature_04(line(vertices), "coin", [10, 200, 10], id="l5"),
    ])
    write_array(config.inbox / "old.geojson", [
        feature_02(rectangle(*boxes[0]), "silver", signed_rgb(190, 190, 200)),
        feature_02(polygon(poly), "worn", signed_rgb(90, 90, 90)),
    ])
    run_once(config, adapters=None)
    predictor = _predictor(conditioned_vit_t, image)

    def upstream(**prompt) -> np.ndarray:
        return predictor.predict(**prompt, multimask_output=False)[0][0]

    polygon_box = np.array([235, 90, 310, 160], np.float32)
    # The Ignore* point is a background point of the prompts near it (box 0 and the point),
    # not of those farther than their own size (at least 128 px) away.
    near = {"point_coords": np.array(background, np.float32), "point_labels": np.array([0])}
    expected_new = {
        0: upstream(box=np.array(boxes[0], np.float32), **near),
        1: upstream(box=np.array(boxes[1], np.float32)),
        2: upstream(box=polygon_box),
        3: upstream(point_coords=np.array(point + background, np.float32), point_labels=np.array([1, 0])),
        # A line: its vertices.
        5: upstream(point_coords=np.array(vertices + background, np.float32), point_labels=np.array([1, 1, 1, 0])),
    }
    expected_old = {0: upstream(box=np.array(boxes[0], np.float32)), 1: expected_new[2]}
    for stem, expected, classes in (("new", expected_new, ["silver", "bronze", "worn", "coin", "coin"]),
                                    ("old", expected_old, ["silver", "worn"])):
        result, error = outcome(config, stem)
        assert error is None, error
        found = by_source(result)
        assert sorted(found) == sorted(expected), stem  # nothing for the Ignore* points
        for index, mask in expected.items():
            assert mask.any()
            assert len(found[index]) == 1, (stem, index)
            feature = found[index][0]
            assert iou(rasterize(feature["geometry"], mask.shape), mask) >= 0.99, (stem, index)
        assert [found[i][0]["properties"]["classification"]["name"] for i in sorted(found)] == classes
    new = by_source(outcome(config, "new")[0])
    assert [new[i][0]["properties"]["source_id"] for i in sorted(new)] == ["r0", "r1", "p2", "m3", "l5"]


# ---- whole slides: level-0 windows around the annotations ---------------------------------------


def test_annotations_on_a_100000_px_slide_are_refined_in_level0_windows(tmp_path) -> None:
    from slides import SparseSlide, skimage_content, write_ome_pyramid

    config = config_for(tmp_path, fake_weights(tmp_path))
    slide = SparseSlide(100_000, 12_000, patches=[(70_016, 9_024, skimage_content(1024, 1024))])
    write_ome_pyramid(config.inbox / "scan.ome.tif", slide, levels=4)
    write_collection(config.inbox / "scan.ome.geojson", [
        feature_04(rectangle(70_100, 9_100, 70_400, 9_400), "Gland", id="small"),
        # A rough tumour outline 3000 px across: a window of its own, read from a coarser level.
        feature_04(polygon([[69_000, 8_500], [72_000, 8_000], [71_500, 11_000], [69_200, 10_800]]), "Tumour", id="rough"),
    ])
    run_once(config)
    result, error = outcome(config, "scan.ome")
    assert error is None, error
    found = by_source(result)
    small = np.array([c for ring in found[0][0]["geometry"]["coordinates"] for c in ring])
    assert small.min(axis=0).tolist() == [70_100, 9_100] and small.max(axis=0).tolist() == [70_400, 9_400]
    rough = np.array([c for ring in found[1][0]["geometry"]["coordinates"] for c in ring])
    assert np.abs(rough.min(axis=0) - [69_000, 8_000]).max() <= 8 and np.abs(rough.max(axis=0) - [72_000, 11_000]).max() <= 8
    tiling = result["samwatch"]["tiling"]
    assert tiling["tiles"] == 2 and tiling["region"] == [0, 0, 100_000, 12_000]
    assert [found[i][0]["properties"]["classification"]["name"] for i in (0, 1)] == ["Gland", "Tumour"]


def test_samwatch_check_reports_an_exports_bad_features(tmp_path) -> None:
    from samwatch.cli.check import check_paths

    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "k.png", SMALL)
    write_collection(config.inbox / "k.geojson", [feature_04(rectangle(5, 5, 50, 50)), feature_04(None, id="nothing")])
    write_collection(config.inbox / "stray.geojson", [feature_04(rectangle(5, 5, 50, 50))])  # no image: no job
    lines = check_paths(config, [])
    assert lines == ["k.geojson: features.1: annotation_invalid: feature 1 (id nothing): the feature has no geometry; "
                     "the run skips it"]


def test_an_export_saved_as_json_is_told_to_be_named_geojson(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    for stem, body in (("f", {"type": "FeatureCollection", "features": []}), ("g", [feature_02(rectangle(1, 1, 5, 5))])):
        save_image(config.inbox / f"{stem}.png", SMALL)
        (config.inbox / f"{stem}.json").write_text(json.dumps(body))
    run_once(config)
    assert "NAME.geojson" in read_json(config.outbox / "f.error.json")["message"]
    assert "NAME.geojson" in read_json(config.outbox / "g.error.json")["message"]


def test_which_geojson_files_are_jobs(tmp_path) -> None:
    from samwatch.control.discovery import find_jobs

    files = ["a.png", "a.geojson", "b.png", "b.yaml", "b.geojson", "c.tif", "c.glands.geojson", "c.yaml",
             "c.export.geojson", "lonely.geojson", "sub/d.ome.tif", "sub/d.ome.geojson"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    named = {"c.yaml": "c.export.geojson"}
    jobs = {job.job_id: job for job in find_jobs(tmp_path, files, lambda rel: None, named.get)}
    assert sorted(jobs) == ["a", "b", "c", "c.glands", "sub/d.ome"]
    assert (jobs["a"].sidecar, jobs["a"].image) == ("a.geojson", "a.png")
    assert jobs["b"].sidecar == "b.yaml"  # a sidecar of the stem owns it; b.geojson is no job of its own
    assert (jobs["c.glands"].sidecar, jobs["c.glands"].image) == ("c.glands.geojson", "c.tif")  # tagged
    assert jobs["c"].annotations == "c.export.geojson" and "c.export.geojson" in jobs["c"].inputs
    assert jobs["sub/d.ome"].image == "sub/d.ome.tif"


def test_derived_classes_and_nested_child_objects(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "n.png", SMALL)
    parent = feature_04(rectangle(5, 5, 80, 80), id="parent")
    parent["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}
    parent["properties"]["childObjects"] = [feature_04(rectangle(10, 10, 30, 30), "Gland", id="child")]
    write_collection(config.inbox / "n.geojson", [parent, feature_04(rectangle(100, 20, 150, 60), "Other", id="next")])
    run_once(config)
    result, error = outcome(config, "n")
    assert error is None, error
    found = by_source(result)
    assert [found[i][0]["properties"]["source_id"] for i in (0, 1, 2)] == ["parent", "child", "next"]
    assert found[0][0]["properties"]["classification"] == {"name": "Tumor: Positive", "color": [200, 0, 0]}


def test_with_a_region_objects_outside_it_are_skipped_and_those_across_it_cut(tmp_path) -> None:
    config = config_for(tmp_path, fake_weights(tmp_path))
    save_image(config.inbox / "r.png", SMALL)
    write_collection(config.inbox / "r.export.geojson", [
        feature_04(rectangle(5, 5, 30, 30), id="outside"), feature_04(rectangle(50, 40, 120, 100), id="across"),
    ])
    write_sidecar(config.inbox / "r.yaml", {"annotations": "r.export.geojson", "region": [40, 30, 60, 50]})
    run_once(config)
    result, error = outcome(config, "r")
    assert error is None, error
    assert sorted(by_source(result)) == [1]
    ring = np.array(result["features"][0]["geometry"]["coordinates"][0])
    assert ring.min(axis=0).tolist() == [50, 40] and ring.max(axis=0).tolist() == [100, 80]
    assert result["samwatch"]["annotations"]["warnings"][0]["id"] == "outside"


def test_annotations_cannot_go_with_tracking_or_automask() -> None:
    from samwatch.errors import JobError
    from samwatch.sidecars.schema import validate_sidecar

    for extra in ({"video": {}}, {"automask": {}}, {"text": "cell"}):
        with pytest.raises(JobError) as caught:
            validate_sidecar({"annotations": "a.geojson", **extra}, name="a.yaml")
        assert caught.value.code == "sidecar_invalid" and "annotations" in caught.value.message
