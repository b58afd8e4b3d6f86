"""A job on a large image or a region: plan the windows, run them one by one, stream the results.

``is_tiled`` decides whether a job is tiled at all (the image or ``region`` is larger than one
window, or a coarser level is asked for); ``plan_for`` checks the ``region:``/``tiling:`` values
against the image. ``segment`` then runs each tile as its own unit (:func:`~samwatch.tiling.tile.run_tile`)
and yields detections as soon as they are final: prompt windows' masks at once, automask and
SAM3 text through the :class:`~samwatch.tiling.stitch.Stitcher`. What no tile saw whole then gets
a second look (samwatch.tiling.refine), and :class:`~samwatch.tiling.once.Once` lets each object
out once. No full-image mask is ever made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from samwatch.errors import JobError
from samwatch.models.base import Detection, ProgressFn
from samwatch.sidecars.schema import Sidecar, TilingSpec
from samwatch.tiling.once import Once
from samwatch.tiling.plan import Rect, TileSpec, plan_prompt_windows, plan_tiles, prompt_extent, to_grid
from samwatch.tiling.refine import (
    LookPlan,
    SecondLook,
    on_finer_grid,
    second_looks,
    view,
)
from samwatch.tiling.stitch import Stitcher
from samwatch.media.slides import RegionSource
from samwatch.tiling.tile import TileJob, run_tile, tile_sidecar


@dataclass(frozen=True)
class TilingPlan:
    """Where a tiled job looks: ``region`` in level-0 pixels, ``grid`` the same at ``downsample``."""

    region: Rect
    grid: Rect
    downsample: float
    level: int
    tile_size: int
    overlap: int


@dataclass
class TilingReport:
    """What a tiled job did, for the result's provenance."""

    plan: TilingPlan
    tiles: int = 0  # windows run through the model
    windows_encoded: int = 0
    tiles_skipped: int = 0  # windows with nothing to do (a box-only SAM3 job's tiles without a box)
    second_looks: int = 0  # objects no tile saw whole, segmented again
    second_look_encodes: int = 0  # windows the second looks encoded
    duplicates_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        region = plan.region
        return {
            "tile_size": plan.tile_size, "overlap": plan.overlap, "level": plan.level,
            "downsample": plan.downsample, "region": [region.x, region.y, region.w, region.h],
            # every window run was encoded, or reused an embedding (the disk cache, or one still
            # in memory: prompt windows snapped to the same place), so the two add up to tiles
            "tiles": self.tiles, "windows_encoded": self.windows_encoded,
            "cache_hits": self.tiles - self.windows_encoded, "tiles_skipped": self.tiles_skipped,
            "second_looks": self.second_looks, "second_look_encodes": self.second_look_encodes,
            "duplicates_dropped": self.duplicates_dropped,
        }


def is_tiled(sidecar: Sidecar, width: int, height: int, *, max_image_pixels: int) -> bool:
    """Whether a job on a ``width`` x ``height`` image goes through tiles (decided from the header:
    a region, a coarser level, or an image larger than one window), after checking ``tiling``."""
    spec = sidecar.tiling or TilingSpec()
    if spec.tile_size * spec.tile_size > max_image_pixels:
        raise JobError(
            "sidecar_invalid",
            f"tiling.tile_size {spec.tile_size} makes tiles of {spec.tile_size ** 2:,} pixels, over "
            f"limits.max_image_pixels ({max_image_pixels:,}); use a smaller tile_size.",
            field="tiling.tile_size",
        )
    full_resolution = spec.level in (None, 0) and spec.downsample in (None, 1)
    fits = width <= spec.tile_size and height <= spec.tile_size
    return sidecar.region is not None or not full_resolution or not fits


def plan_for(sidecar: Sidecar, source: RegionSource) -> TilingPlan:
    """The tiling of a tiled job (see :func:`is_tiled`) on ``source``."""
    spec = sidecar.tiling or TilingSpec()
    region = _region(sidecar, source.width, source.height)
    if spec.level is not None:
        source.check_level(spec.level)
        level, downsample = spec.level, float(source.levels[spec.level].downsample)
    elif spec.downsample is not None:
        downsample = float(spec.downsample)
        level = source.best_level(downsample)
    else:
        level, downsample = 0, 1.0
    return TilingPlan(region, to_grid(region, downsample), downsample, level, spec.tile_size, spec.overlap)


def _region(sidecar: Sidecar, width: int, height: int) -> Rect:
    if sidecar.region is None:
        return Rect(0, 0, width, height)
    x, y, w, h = sidecar.region
    if x + w > width or y + h > height:
        raise JobError(
            "region_out_of_bounds",
            f"The region [{x}, {y}, {w}, {h}] (x, y, width, height) reaches beyond the {width}×{height} image; "
            "region coordinates are full-resolution (level-0) pixels, origin top-left.",
            field="region",
        )
    return Rect(x, y, w, h)


def plan_windows(sidecar: Sidecar, plan: TilingPlan, source: RegionSource) -> tuple[list[TileSpec], bool]:
    """The job's windows, and whether their results are stitched (tiles) or final (prompt windows)."""
    if sidecar.mode != "prompts":
        return plan_tiles(plan.grid, plan.tile_size, plan.overlap, plan.downsample, plan.level), True
    _check_prompts(sidecar, plan.region)
    if plan.grid.w <= plan.tile_size and plan.grid.h <= plan.tile_size:
        everything = tuple(range(len(sidecar.prompts)))
        return [TileSpec(0, 1, plan.grid, plan.grid, plan.downsample, plan.level, everything)], False
    windows = plan_prompt_windows(
        sidecar.prompts, plan.region, plan.tile_size, plan.overlap, plan.downsample, source.best_level
    )
    return windows, False


def _check_prompts(sidecar: Sidecar, region: Rect) -> None:
    """Prompts lie in the region (level-0 pixels); mask prompts need the whole image in one window."""
    surface = "region" if sidecar.region is not None else "image"
    for index, prompt in enumerate(sidecar.prompts):
        if prompt.mask is not None or prompt.b64mask is not None:
            raise JobError(
                "sidecar_invalid",
                "Mask prompts need the whole image in one window: drop the mask, or the region and tiling.",
                field=f"prompts.{index}.{'mask' if prompt.mask is not None else 'b64mask'}",
            )
        x1, y1, x2, y2 = prompt_extent(prompt)
        if x1 < region.x or y1 < region.y or x2 > region.x2 or y2 > region.y2:
            raise JobError(
                "prompt_out_of_bounds",
                f"prompts.{index} spans [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (x1, y1, x2, y2), outside the {surface} "
                f"[{region.x}, {region.y}, {region.w}, {region.h}] (x, y, width, height); prompts are "
                "full-resolution (level-0) pixels of the image, origin top-left.",
                field=f"prompts.{index}",
            )


#: Of a stitched job's progress, the share of the tiles (the rest is for second looks).
_TILES_SHARE = 0.9


def segment(
    adapter: Any, source: RegionSource, job: TileJob, plan: TilingPlan, progress: ProgressFn, report: TilingReport,
    *, max_object_pixels: int = 1 << 26,
) -> Iterator[Detection]:
    """Every window of the job in turn (cancellable between them), results as they become final;
    stitched objects larger than ``max_object_pixels`` (grid pixels) get a second look at a
    coarser resolution."""
    tiles, stitched = plan_windows(job.sidecar, plan, source)
    if not stitched:
        yield from _prompt_windows(adapter, tiles, source, job, progress, report)
        return
    stitcher = Stitcher(tiles, max_pixels=max_object_pixels)
    once = Once(cell=round(plan.tile_size * plan.downsample))
    window0 = plan.tile_size * plan.downsample

    def done(box: Rect) -> bool:  # nothing to come, neither a tile nor a pending second look, can meet it
        grown = Rect(math.floor(box.x - window0), math.floor(box.y - window0), math.ceil(box.w + 2 * window0),
                     math.ceil(box.h + 2 * window0))
        return stitcher.settled(grown) and not any(look.box.intersection(box) for look in stitcher.looks)

    for tile in tiles:
        progress("tiles", _TILES_SHARE * tile.index / len(tiles), f"tile {tile.index + 1}/{len(tiles)}")
        _count_tile(job, tile, report)
        detections = run_tile(adapter, tile, source, job, _tile_progress(progress, tile, report, _TILES_SHARE))
        yield from _admitted(once, stitcher.add(tile, detections))
        once.forget(done)
    yield from _admitted(once, stitcher.finish())
    yield from _admitted(once, _second_looks(adapter, stitcher.looks, source, job, plan, progress, report))
    report.duplicates_dropped += once.dropped


def _count_tile(job: TileJob, tile: TileSpec, report: TilingReport) -> None:
    if tile_sidecar(job.sidecar, tile) is None:
        report.tiles_skipped += 1
    else:
        report.tiles += 1


def _prompt_windows(
    adapter: Any, tiles: list[TileSpec], source: RegionSource, job: TileJob, progress: ProgressFn, report: TilingReport,
) -> Iterator[Detection]:
    """Each prompt window's masks, final as they come (each prompt is asked in one window)."""
    for tile in tiles:
        progress("tiles", tile.index / len(tiles), f"tile {tile.index + 1}/{len(tiles)}")
        _count_tile(job, tile, report)
        for detection in run_tile(adapter, tile, source, job, _tile_progress(progress, tile, report, 1.0)):
            yield view(detection, "whole", tile.level)


def _second_looks(
    adapter: Any, looks: list[SecondLook], source: RegionSource, job: TileJob, plan: TilingPlan, progress: ProgressFn,
    report: TilingReport,
) -> Iterator[Detection]:
    """What the second looks found (``refining 5/12``)."""
    report.second_looks += len(looks)
    look_plan = LookPlan(plan.region, plan.downsample, plan.tile_size, plan.overlap)

    def window_progress(done: int, total: int) -> ProgressFn:
        progress("tiles", _TILES_SHARE + (1 - _TILES_SHARE) * done / total, f"refining {done + 1}/{total}")
        return _look_progress(progress, done, total, report)

    for detection, window in second_looks(adapter, looks, source, job, look_plan, window_progress):
        yield on_finer_grid(view(detection, "refined", window.level), plan.downsample)


def _admitted(once: Once, detections: Iterable[Detection]) -> Iterator[Detection]:
    return (detection for detection in detections if once.admit(detection))


def _tile_progress(progress: ProgressFn, tile: TileSpec, report: TilingReport, share: float) -> ProgressFn:
    """The adapter's progress as a share of its tile's; counts the windows the encoder ran on."""

    encoded = False

    def report_stage(stage: str, fraction: float, message: str = "") -> None:
        nonlocal encoded
        if stage == "encoding image" and not encoded:  # a cached embedding skips the stage
            encoded = True
            report.windows_encoded += 1
        progress("tiles", share * (tile.index + fraction) / tile.count, f"tile {tile.index + 1}/{tile.count}: {stage}")

    return report_stage


def _look_progress(progress: ProgressFn, index: int, count: int, report: TilingReport) -> ProgressFn:
    """A second look's progress, its windows' encodes counted."""

    encoded = False

    def report_stage(stage: str, fraction: float, message: str = "") -> None:
        nonlocal encoded
        if stage == "encoding image" and not encoded:
            encoded = True
            report.second_look_encodes += 1
        progress("tiles", _TILES_SHARE + (1 - _TILES_SHARE) * (index + fraction) / count,
                 f"refining {index + 1}/{count}: {stage}")

    return report_stage
