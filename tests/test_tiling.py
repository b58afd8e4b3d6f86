"""Tiling: the planner, the stitcher with the fake model's painted objects, prompt windows."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeAdapter, painted_objects
from seams import Crop, best_iou, crop_of_detection, duplicates, seam_edges, seam_lines

from samwatch.errors import JobCancelled, JobError
from samwatch.media.read import MediaLimits
from samwatch.sidecars.schema import validate_sidecar
from samwatch.media.slides import ArraySource
from samwatch.tiling.plan import Rect, plan_tiles
from samwatch.tiling.segment import TilingReport, is_tiled, plan_for, plan_windows, segment
from samwatch.tiling.tile import TileJob, tile_sidecar

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 64, 32)]


def _source(image: np.ndarray) -> ArraySource:
    return ArraySource("painted.png", image, MediaLimits())


def _painted(height: int, width: int, shapes: list[tuple[slice, slice]]) -> tuple[np.ndarray, list[np.ndarray]]:
    image = np.zeros((height, width, 3), np.uint8)
    masks = []
    yy, xx = np.mgrid[:height, :width]
    for colour, shape in zip(COLOURS, shapes):
        if isinstance(shape, tuple) and isinstance(shape[0], slice):
            mask = np.zeros((height, width), bool)
            mask[shape] = True
        else:  # a disc (cx, cy, r)
            cx, cy, r = shape
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[mask] = colour
        masks.append(mask)
    return image, masks


def _placed(detection, height: int, width: int) -> np.ndarray:
    full = np.zeros((height, width), bool)
    x, y = (int(v) for v in detection.origin)
    h, w = detection.mask.shape
    full[y:y + h, x:x + w] = detection.mask
    return full


class ContextSensitive(FakeAdapter):
    """A fake that, as a real model does, sees an object differently in each window: an object
    cut by the window's left border (inside the image) is seen only in its top 40 %, so the two
    tiles of a seam disagree where both look."""

    def run(self, ctx):  # noqa: ANN001, ANN201
        if ctx.sidecar.mode not in ("automask", "text"):
            yield from super().run(ctx)
            return
        ctx.progress("encoding image", 0.0)
        window_x = int(ctx.image_key.rsplit(":", 1)[1].split(",")[0])
        for detection in painted_objects(ctx.image):
            rows = np.flatnonzero(detection.mask.any(axis=1))
            if window_x > 0 and detection.mask[:, 0].any():
                detection.mask[rows[0] + int(0.4 * (rows[-1] + 1 - rows[0])):] = False
            yield detection


def _run(image: np.ndarray, body: dict, adapter=None, messages=None, **options) -> tuple[list, TilingReport]:  # noqa: ANN001
    sidecar = validate_sidecar(body, name="t.yaml")
    source = _source(image)
    assert is_tiled(sidecar, source.width, source.height, max_image_pixels=10**9)
    plan = plan_for(sidecar, source)
    report = TilingReport(plan)
    job = TileJob(sidecar=sidecar, image_key="painted")
    messages = [] if messages is None else messages
    detections = list(segment(adapter or FakeAdapter(), source, job, plan, lambda s, f, m="": messages.append(m),
                              report, **options))
    return detections, report


def _assert_clean(detections: list, image: np.ndarray, report: TilingReport) -> None:
    """No edge along a seam, no object twice."""
    sidecar_plan = report.plan
    tiles = plan_tiles(sidecar_plan.grid, sidecar_plan.tile_size, sidecar_plan.overlap, sidecar_plan.downsample, 0)
    region = sidecar_plan.region
    crops = [crop_of_detection(d) for d in detections]
    assert seam_edges(crops, seam_lines(tiles, (region.x, region.y, region.w, region.h))) == []
    assert duplicates(crops) == []


def test_tiles_cover_the_region_with_cores_that_partition_it() -> None:
    region = Rect(100, 50, 2500, 1300)
    tiles = plan_tiles(region, 1024, 128, 1.0, 0)
    covered = np.zeros((region.y2, region.x2), np.int32)
    for tile in tiles:
        assert (tile.window.w, tile.window.h) == (1024, 1024)
        assert region.x <= tile.window.x and tile.window.x2 <= region.x2
        core = tile.core
        assert tile.window.intersection(core) == core
        covered[core.y:core.y2, core.x:core.x2] += 1
    assert (covered[region.y:, region.x:] == 1).all()
    xs = sorted({t.window.x for t in tiles})
    assert all(b - a <= 1024 - 128 for a, b in zip(xs, xs[1:]))


def test_objects_across_seams_come_out_once_each_with_their_area() -> None:
    height, width = 1100, 1400
    shapes = [
        (480, 300, 30),                       # a disc across the first vertical seam
        (slice(380, 450), slice(700, 760)),   # a box across a horizontal seam (y 403)
        (478, 403, 40),                       # on the corner of four tiles
        (slice(150, 190), slice(50, 1350)),   # a bar wider than the halo, through every column
        (slice(600, 1050), slice(1200, 1230)),  # a tall bar through two rows
        (200, 800, 15),                       # well inside one tile
    ]
    image, masks = _painted(height, width, shapes)
    detections, report = _run(image, {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}})
    assert report.tiles == 9
    assert len(detections) == len(masks)
    found = [_placed(d, height, width) for d in detections]
    for mask in masks:
        same = [f for f in found if (f & mask).any()]
        assert len(same) == 1
        assert same[0].sum() == mask.sum() and (same[0] == mask).all()


def test_a_region_limits_automask_and_shifts_nothing() -> None:
    image, masks = _painted(900, 900, [(600, 620, 30), (100, 100, 20)])
    detections, report = _run(image, {"label": "painted", "region": [500, 500, 300, 300]})
    assert report.tiles == 1
    (only,) = detections
    assert (_placed(only, 900, 900) == masks[0]).all()


def test_region_and_tiling_bad_values() -> None:
    image = np.zeros((600, 800, 3), np.uint8)
    source = _source(image)
    with pytest.raises(JobError) as outside:
        plan_for(validate_sidecar({"region": [700, 0, 200, 100]}, name="s"), source)
    assert outside.value.code == "region_out_of_bounds"
    for body, field in (
        ({"region": [0, 0, 0, 10]}, "region"),
        ({"tiling": {"tile_size": 128}}, "tiling.tile_size"),
        ({"tiling": {"tile_size": 512, "overlap": 512}}, "tiling"),
    ):
        with pytest.raises(JobError) as bad:
            validate_sidecar(body, name="s")
        assert bad.value.code == "sidecar_invalid" and bad.value.field.startswith(field)
    with pytest.raises(JobError) as too_big:
        is_tiled(validate_sidecar({"tiling": {"tile_size": 2048}}, name="s"), 800, 600, max_image_pixels=2000**2)
    assert (too_big.value.code, too_big.value.field) == ("sidecar_invalid", "tiling.tile_size")


def test_prompts_share_windows_and_map_back_to_level0() -> None:
    image = np.zeros((3000, 3000, 3), np.uint8)
    prompts = [
        {"bbox": [100, 100, 140, 150]}, {"bbox": [300, 200, 360, 260]},  # together in one window
        {"bbox": [2500, 2500, 2550, 2560]},                              # far away: its own
        {"bbox": [200, 1000, 2800, 2900]},                               # larger than a window
    ]
    detections, report = _run(image, {"prompts": prompts})
    assert report.tiles == 3
    by_prompt = {d.prompt_idx: d for d in detections}
    for index, prompt in enumerate(prompts):
        x1, y1, x2, y2 = prompt["bbox"]
        detection = by_prompt[index]
        h, w = detection.mask.shape
        ox, oy = detection.origin
        assert abs(ox - x1) <= detection.scale and abs(oy - y1) <= detection.scale
        assert abs(ox + w * detection.scale - x2) <= 2 * detection.scale
    assert by_prompt[3].scale > 2 and by_prompt[0].scale == 1


def test_prompts_outside_the_region_are_refused() -> None:
    image = np.zeros((3000, 3000, 3), np.uint8)
    with pytest.raises(JobError) as outside:
        _run(image, {"region": [1000, 1000, 500, 500], "prompts": [{"bbox": [900, 1100, 1200, 1200]}]})
    assert (outside.value.code, outside.value.field) == ("prompt_out_of_bounds", "prompts.0")


def test_progress_names_the_tile_and_cancelling_stops_between_tiles() -> None:
    image, _ = _painted(1400, 1400, [(700, 700, 30)])
    sidecar = validate_sidecar({"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}}, name="t.yaml")
    source = _source(image)
    plan = plan_for(sidecar, source)
    seen: list[str] = []

    def progress(stage: str, fraction: float, message: str = "") -> None:
        seen.append(message)
        if message == "tile 4/9":
            raise JobCancelled()

    ran = []
    adapter = FakeAdapter()
    original = adapter.run
    adapter.run = lambda ctx: (ran.append(1), original(ctx))[1]
    with pytest.raises(JobCancelled):
        list(segment(adapter, source, TileJob(sidecar=sidecar, image_key="k"), plan, progress, TilingReport(plan)))
    assert len(ran) == 3 and "tile 1/9" in seen and "tile 3/9: encoding image" in seen


def test_sam3_exemplar_boxes_go_to_the_tiles_that_hold_them() -> None:
    sidecar = validate_sidecar({"text": "cell", "positive_bboxes": [[100, 100, 150, 160], [1300, 1300, 1350, 1340]]},
                               name="t")
    tiles = plan_tiles(Rect(0, 0, 1400, 1400), 512, 64, 1.0, 0)
    first, last = tile_sidecar(sidecar, tiles[0]), tile_sidecar(sidecar, tiles[-1])
    assert first.positive_bboxes == [(100, 100, 150, 160)] and first.text == "cell"
    x, y = tiles[-1].window.x, tiles[-1].window.y
    assert last.positive_bboxes == [(1300 - x, 1300 - y, 1350 - x, 1340 - y)]
    boxes_only = validate_sidecar({"positive_bboxes": [[100, 100, 150, 160]]}, name="t")
    assert tile_sidecar(boxes_only, tiles[-1]) is None


def test_a_tissue_sized_object_comes_out_once_from_a_coarser_look() -> None:
    height, width = 1100, 1400
    image, (disc,) = _painted(height, width, [(300, 300, 40)])
    image[~disc] = (250, 250, 250)  # a background spanning every tile
    detections, report = _run(image, {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}},
                              max_object_pixels=800 * 800)
    found = [crop_of_detection(d) for d in detections]
    assert len(found) == 2 and report.second_looks == 1
    (tissue,) = [d for d in detections if d.extra["tiling"]["view"] == "refined"]
    # seen at a downsample over 2, written smoothed on the job's grid (refine.on_finer_grid)
    assert tissue.extra["tiling"]["view"] == "refined" and tissue.extra["tiling"]["downsample"] > 2
    assert tissue.extra["tiling"]["level"] == 0 and tissue.scale == 1.0
    assert best_iou(Crop(~disc, 0, 0), found) > 0.97
    assert best_iou(Crop(disc, 0, 0), found) == 1.0
    _assert_clean(detections, image, report)


def test_the_tile_embedding_store_round_trips_and_evicts_the_least_recently_used(tmp_path) -> None:
    import os

    import torch

    from samwatch.tiling.cache import TileEmbeddingStore

    def embedding(seed: int) -> dict:  # SAM2's layout: nested containers of tensors, sizes as tuples
        generator = torch.Generator().manual_seed(seed)
        return {"_features": {"image_embed": torch.rand(1, 8, 16, 16, generator=generator),
                              "high_res_feats": [torch.rand(1, 4, 32, 32, generator=generator)]},
                "_orig_hw": [(1024, 1024)]}

    store = TileEmbeddingStore(tmp_path, "sam2_t:abc", max_bytes=10**9)
    store.save("a", embedding(1))
    back = store.load("a", "cpu")
    assert back["_orig_hw"] == [(1024, 1024)]
    assert torch.equal(back["_features"]["high_res_feats"][0], embedding(1)["_features"]["high_res_feats"][0])
    assert store.load("b", "cpu") is None and (store.hits, store.misses) == (1, 1)
    assert TileEmbeddingStore(tmp_path, "vit_t:abc", 10**9).load("a", "cpu") is None  # another model's key

    size = store._path("a").stat().st_size
    small = TileEmbeddingStore(tmp_path, "sam2_t:abc", max_bytes=int(size * 3.5))
    small.save("b", embedding(2))
    small.save("c", embedding(3))
    for age, key in enumerate("abc"):
        os.utime(small._path(key), (1000 + age, 1000 + age))
    assert small.load("a", "cpu") is not None  # a becomes the most recently used
    small.save("d", embedding(4))  # over the bound: the least recently used (b) goes
    assert [small._path(k).exists() for k in "abcd"] == [True, False, True, True]
    small._path("a").write_bytes(b"damaged")
    assert small.load("a", "cpu") is None and not small._path("a").exists()  # a damaged file is a miss


def test_masks_overlapping_within_a_tile_are_not_chained_through_a_neighbour() -> None:
    from samwatch.models.base import Detection
    from samwatch.tiling.stitch import Stitcher

    tiles = plan_tiles(Rect(0, 0, 896, 512), 512, 128, 1.0, 0)
    assert [t.window.x for t in tiles] == [0, 384]
    cell = np.zeros((512, 896), bool)
    cell[100:300, 300:600] = True
    nucleus = np.zeros((512, 896), bool)
    nucleus[110:290, 390:510] = True  # most of the cell where both tiles look

    def seen_by(tile, mask):
        window = tile.window
        crop = mask[window.y:window.y2, window.x:window.x2]
        ys, xs = np.nonzero(crop)
        return Detection(mask=crop[ys.min():ys.max() + 1, xs.min():xs.max() + 1], score=0.9,
                         origin=(window.x + xs.min(), window.y + ys.min()))

    stitcher = Stitcher(tiles)
    out = []
    for tile in tiles:
        out += stitcher.add(tile, [seen_by(tile, cell), seen_by(tile, nucleus)])
    out += stitcher.finish()
    assert sorted(int(d.mask.sum()) for d in out) == sorted([int(nucleus.sum()), int(cell.sum())])


SEEN_DIFFERENTLY = [
    (480, 300, 60),                        # a disc across the first vertical seam
    (slice(600, 700), slice(300, 1100)),   # a bar 3 windows wide
    (slice(880, 1000), slice(820, 990)),   # across a vertical seam, near the bottom
    (200, 800, 15),                        # well inside one tile
]


@pytest.mark.parametrize("mode", [{}, {"text": "painted things"}], ids=["automask", "sam3-text"])
def test_an_object_each_neighbour_sees_differently_is_segmented_again_whole_and_once(mode: dict) -> None:
    height, width = 1100, 1400
    image, masks = _painted(height, width, SEEN_DIFFERENTLY)
    messages: list[str] = []
    detections, report = _run(image, {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}, **mode},
                              adapter=ContextSensitive(), messages=messages)
    crops = [crop_of_detection(d) for d in detections]
    assert len(detections) == len(masks)
    for mask in masks:  # the bar is wider than a window: seen whole at a coarser downsample
        assert best_iou(Crop(mask, 0, 0), crops) > 0.95
    assert report.second_looks >= 3 and report.duplicates_dropped >= 1
    views = {d.extra["tiling"]["view"] for d in detections}
    assert views == {"whole", "refined"}
    looks = [m for m in messages if m.startswith("refining") and ":" not in m]
    assert looks[0] == f"refining 1/{report.second_looks}" and messages.index(looks[0]) > messages.index("tile 9/9")
    _assert_clean(detections, image, report)


def test_an_object_larger_than_a_window_is_seen_whole_at_a_coarser_downsample() -> None:
    height, width = 1100, 1400
    image, (bar,) = _painted(height, width, [(slice(300, 800), slice(100, 1300))])
    detections, report = _run(image, {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}},
                              adapter=ContextSensitive())
    (only,) = detections
    assert only.extra["tiling"]["downsample"] > 2 and only.scale == 1.0  # seen coarser, written on the job's grid
    assert best_iou(Crop(bar, 0, 0), [crop_of_detection(only)]) > 0.98
    _assert_clean(detections, image, report)


def test_tiled_equals_untiled_on_an_image_that_fits_one_window() -> None:
    height, width = 1000, 1000
    image, masks = _painted(height, width, SEEN_DIFFERENTLY[:1] + [(slice(400, 520), slice(100, 980)), (750, 750, 90)])
    untiled = [Crop(d.mask, 0, 0) for d in painted_objects(image)]
    detections, report = _run(image, {"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}},
                              adapter=ContextSensitive())
    tiled = [crop_of_detection(d) for d in detections]
    assert len(tiled) == len(untiled)
    assert all(best_iou(crop, tiled) >= 0.9 for crop in untiled)
    _assert_clean(detections, image, report)


def test_cancelling_stops_between_second_looks() -> None:
    image, _ = _painted(1100, 1400, SEEN_DIFFERENTLY)
    sidecar = validate_sidecar({"label": "painted", "tiling": {"tile_size": 512, "overlap": 64}}, name="t.yaml")
    source = _source(image)
    plan = plan_for(sidecar, source)

    def progress(stage: str, fraction: float, message: str = "") -> None:
        if message.startswith("refining 1/"):
            raise JobCancelled()

    adapter = ContextSensitive()
    prompted = []
    original = adapter.run
    adapter.run = lambda ctx: (prompted.append(ctx.sidecar.mode), original(ctx))[1]
    with pytest.raises(JobCancelled):
        list(segment(adapter, source, TileJob(sidecar=sidecar, image_key="k"), plan, progress, TilingReport(plan)))
    assert prompted.count("automask") == 9 and prompted.count("prompts") == 0


def test_the_seam_and_duplicate_checks_find_a_cut_object_and_a_repeated_one() -> None:
    tiles = plan_tiles(Rect(0, 0, 896, 512), 512, 128, 1.0, 0)
    lines = seam_lines(tiles, (0, 0, 896, 512))
    assert lines == ({384, 448, 512}, set())
    cut = Crop(np.ones((60, 100), bool), 412, 100)  # ends at x = 512, a window border
    round_one = Crop(_painted(512, 896, [(200, 200, 40)])[1][0], 0, 0)
    assert seam_edges([round_one, cut], lines) == [(1, "x", 512, 60)]
    shifted = Crop(round_one.mask[:, 2:], 2, 0)
    assert duplicates([round_one, cut, shifted]) == [(0, 2, 1.0)]
