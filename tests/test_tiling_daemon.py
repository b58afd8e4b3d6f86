"""Tiled jobs through a running daemon: stitching on a slide, bad region/tiling values, the
tile-embedding cache across a sidecar change, a tagged sidecar and a restart, and a real
random-weight vit_t (on a region of a 40 000² slide) and sam2_t tiled automask: no edge along a
seam, no object twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from seams import crops_of, duplicates, seam_edges, seam_lines
from slides import SparseSlide, skimage_content, write_ome_pyramid
from support import (
    DaemonProcess,
    coins,
    fake_weights,
    finished,
    read_json,
    save_image,
    wait_for,
    write_config,
    write_sidecar,
)

from samwatch.geometry.raster import rasterize
from samwatch.tiling.plan import Rect, plan_tiles

pytestmark = pytest.mark.subprocess  # each test starts a real samwatch process

JOB_TIMEOUT = 120
REAL_MODEL_TIMEOUT = 800  # a deadline, not a wait: a busy 2-core machine
PAINTED = [  # (colour, slices or disc) on a black 3000 x 2400 slide, tiles of 512 with a 64 halo
    ((255, 0, 0), (700, 470, 35)),                           # across a vertical seam
    ((0, 255, 0), (slice(380, 460), slice(1500, 1580))),     # across a horizontal seam
    ((0, 0, 255), (slice(1000, 1060), slice(100, 2900))),    # a bar through every column
    ((255, 255, 0), (2000, 1800, 25)),                       # inside one tile
]


def _painted_slide() -> tuple[SparseSlide, list[np.ndarray]]:
    height, width = 2400, 3000
    pixels = np.zeros((height, width, 3), np.uint8)
    yy, xx = np.ogrid[:height, :width]
    masks = []
    for colour, shape in PAINTED:
        if isinstance(shape[0], slice):
            mask = np.zeros((height, width), bool)
            mask[shape] = True
        else:
            cx, cy, r = shape
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        pixels[mask] = colour
        masks.append(mask)
    return SparseSlide(width, height, background=(0, 0, 0), patches=[(0, 0, pixels)]), masks


def _outcome(outbox: Path, stem: str) -> tuple[dict | None, dict | None]:
    wait_for(lambda: finished(outbox, stem), JOB_TIMEOUT, what=f"{stem} to finish")
    return read_json(outbox / f"{stem}.geojson"), read_json(outbox / f"{stem}.error.json")


@pytest.fixture(scope="module")
def fake_service(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiling-fake")
    # A small decode limit: the slide is read tile by tile under it; tiles above it are refused.
    config = write_config(root, fake_weights(root), limits={"max_image_pixels": 1_500_000})
    daemon = DaemonProcess(config, fake_model=True)
    yield root, daemon
    assert daemon.stop() == 0, daemon.log()


def test_objects_crossing_seams_of_a_slide_are_one_feature_each(fake_service) -> None:
    root, daemon = fake_service
    slide, masks = _painted_slide()
    write_ome_pyramid(root / "inbox" / "painted.ome.tif", slide, levels=2)
    write_sidecar(root / "inbox" / "painted.ome.yaml", {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}})
    result, error = _outcome(root / "outbox", "painted.ome")
    assert error is None, error
    provenance = result["samwatch"]["tiling"]
    assert provenance["tiles"] == 7 * 6 and provenance["tile_size"] == 512 and provenance["region"] == [0, 0, 3000, 2400]
    assert len(result["features"]) == len(masks)
    found = [rasterize(f["geometry"], masks[0].shape) for f in result["features"]]
    for mask in masks:
        same = [f for f in found if (f & mask).any()]
        assert len(same) == 1 and (same[0] == mask).all()


@pytest.mark.parametrize("stem, body, code, field", [
    ("outside", {"region": [2900, 0, 200, 100]}, "region_out_of_bounds", "region"),
    ("empty", {"region": [10, 10, 0, 50]}, "sidecar_invalid", "region"),
    ("small-tile", {"tiling": {"tile_size": 128}}, "sidecar_invalid", "tiling.tile_size"),
    ("huge-tile", {"tiling": {"tile_size": 2048}}, "sidecar_invalid", "tiling.tile_size"),
    ("overlap", {"tiling": {"tile_size": 512, "overlap": 512}}, "sidecar_invalid", "tiling"),
    ("no-level", {"tiling": {"level": 5}}, "slide_level_missing", "tiling.level"),
])
def test_bad_region_and_tiling_values_get_their_code(fake_service, stem: str, body: dict, code: str, field: str) -> None:
    root, daemon = fake_service
    slide, _ = _painted_slide()
    image = root / "inbox" / "bad" / f"{stem}.ome.tif"
    image.parent.mkdir(exist_ok=True)
    write_ome_pyramid(image, slide, levels=2)
    write_sidecar(image.with_name(f"{stem}.ome.yaml"), {"label": "painted", **body})
    result, error = _outcome(root / "outbox" / "bad", f"{stem}.ome")
    assert result is None and error is not None
    assert error["error"] == code and error.get("field", "").startswith(field), error
    assert daemon.alive()


def test_tile_embeddings_survive_a_sidecar_change_a_tagged_sidecar_and_a_restart(
    tmp_path: Path, vit_t_checkpoint: Path
) -> None:
    config = write_config(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    big = np.full((1400, 1800), 40, np.uint8)
    big[900:1203, 1200:1584] = coins()
    save_image(inbox / "mosaic.png", big)

    def job(sidecar: str, stem: str, bbox: list[int]) -> dict:
        write_sidecar(inbox / sidecar, {"model": "vit_t", "prompts": [{"bbox": bbox}, {"points": [[1300, 1000]]}]})
        wait_for(lambda: (read_json(outbox / f"{stem}.geojson") or {}).get("samwatch", {}).get("sidecar") == sidecar
                 and bbox == read_json(outbox / f"{stem}.geojson")["samwatch"]["parameters"]["prompts"][0]["bbox"],
                 JOB_TIMEOUT, what=f"{stem} with {bbox}")
        return read_json(outbox / f"{stem}.geojson")["samwatch"]["tiling"]

    daemon = DaemonProcess(config)
    first = job("mosaic.yaml", "mosaic", [1240, 940, 1320, 1010])
    assert (first["tiles"], first["windows_encoded"], first["cache_hits"]) == (1, 1, 0)
    changed = job("mosaic.yaml", "mosaic", [1250, 950, 1330, 1020])
    assert changed["windows_encoded"] == 0
    assert daemon.stop() == 0, daemon.log()
    cached = list((tmp_path / "state" / "tile-embeddings").glob("*.pt"))
    assert len(cached) == 1

    daemon = DaemonProcess(config)
    tagged = job("mosaic.cells.yaml", "mosaic.cells", [1260, 960, 1340, 1030])
    assert (tagged["windows_encoded"], tagged["cache_hits"]) == (0, 1)
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.timeout(900)  # a real model on 4 windows: a minute on 2 quiet cores, far more on a busy machine
@pytest.mark.parametrize("model, image", [("vit_t", "slide"), ("sam2_t", "png")])
def test_a_real_model_tiled_automask_has_no_seam_edges_and_no_duplicates(
    tmp_path: Path, model: str, image: str, request: pytest.FixtureRequest
) -> None:
    """vit_t on a region of a 40 000² sparse slide (the path a scanner's file takes), sam2_t on a
    plain image: the same seam and duplicate checks in level-0 pixels."""
    weights = request.getfixturevalue("conditioned_vit_t" if model == "vit_t" else "conditioned_sam2_t")
    config = write_config(tmp_path, [{"name": "default", "type": model, "path": str(weights)}])
    size, tiling = 768, {"tile_size": 512, "overlap": 64}
    # pieces every 300 px: their straight edges lie on none of the tiles' seams (256, 384, 512)
    content = skimage_content(size, size, pitch=300)
    body = {"model": model, "tiling": tiling,
            "automask": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                         "include_image_edge": True}}
    if image == "slide":
        x, y = 20_480, 12_288
        slide = SparseSlide(40_000, 40_000, patches=[(x, y, content)])
        write_ome_pyramid(tmp_path / "inbox" / "astronaut.ome.tif", slide, levels=4)
        body["region"] = [x, y, size, size]
    else:
        x, y = 0, 0
        save_image(tmp_path / "inbox" / "astronaut.png", content)
    write_sidecar(tmp_path / "inbox" / "astronaut.yaml", body)
    daemon = DaemonProcess(config)
    try:
        wait_for(lambda: finished(tmp_path / "outbox", "astronaut"), REAL_MODEL_TIMEOUT, what="the tiled automask")
        result, error = _outcome(tmp_path / "outbox", "astronaut")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert error is None, error
    crops = crops_of(result["features"])
    provenance = result["samwatch"]["tiling"]
    assert crops and provenance["tiles"] == 4
    region = Rect(x, y, size, size)
    tiles = plan_tiles(region, tiling["tile_size"], tiling["overlap"], 1.0, 0)
    assert seam_edges(crops, seam_lines(tiles, (x, y, size, size))) == []
    assert duplicates(crops) == []
    views = {f["properties"]["tiling"]["view"] for f in result["features"]}
    assert views <= {"whole", "joined", "refined"}
