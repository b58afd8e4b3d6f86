"""Second looks: an object no tile saw whole is segmented again in a window that holds it whole.

The stitcher hands over what it could not finish (:class:`SecondLook`): a fragment cut by its
window that no neighbour confirmed, a union of fragments that still ends at a window border,
or an object larger than ``max_object_pixels``. Each is prompted with a box, its extent (grown
by the overlap towards the sides where it was cut), in a square window around it with context,
at the job's resolution while that fits the model input and coarser (read from the pyramid level
that matches) when the object is larger. While the new mask still touches the window's border,
the box grows to the mask and the window doubles, up to the whole region at a downsample that
fits one window. SAM3 (text), which takes no box prompt, runs its text in that window instead and
the object that overlaps the look's own mask best is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from samwatch.models.base import Detection, ProgressFn
from samwatch.sidecar import Prompt, Sidecar
from samwatch.slides import RegionSource
from samwatch.tiling.once import _entry, mask_iou
from samwatch.tiling.plan import Rect, TileSpec, to_grid
from samwatch.tiling.tile import TileJob, run_tile


@dataclass
class SecondLook:
    """An object to segment again: ``box`` in level-0 pixels; ``template`` gives its metadata;
    ``seen`` is what the tiles saw of it (placed), None when it was too large to hold."""

    box: Rect
    template: Detection
    seen: Detection | None


@dataclass(frozen=True)
class LookPlan:
    """What every second look of one job shares: the region (level-0), the job's grid resolution,
    the window size and the context (grid pixels) kept around a box."""

    region: Rect
    downsample: float
    tile_size: int
    overlap: int


def view(detection: Detection, how: str, level: int) -> Detection:
    """``detection`` with its provenance: which view it is, at which level and downsample."""
    detection.extra = {**detection.extra, "tiling": {"view": how, "level": level, "downsample": detection.scale}}
    return detection


def _grown(box: Rect, by: float, bounds: Rect) -> Rect:
    grown = Rect(math.floor(box.x - by), math.floor(box.y - by), math.ceil(box.w + 2 * by), math.ceil(box.h + 2 * by))
    return grown.intersection(bounds) or box


def _union(a: Rect, b: Rect) -> Rect:
    x, y = min(a.x, b.x), min(a.y, b.y)
    return Rect(x, y, max(a.x2, b.x2) - x, max(a.y2, b.y2) - y)


def _axis(low: int, high: int, span: float, start: int, stop: int) -> tuple[int, int]:
    """``span`` level-0 pixels centred on [low, high), shifted inside [start, stop), cut to it."""
    if stop - start <= span:
        return start, stop
    first = min(max((low + high - span) / 2, start), stop - span)
    return math.floor(first), min(stop, math.floor(first) + math.ceil(span))


def window_for(box: Rect, side: float, plan: LookPlan, source: RegionSource) -> TileSpec:
    """A one-prompt window of ``side`` level-0 pixels around ``box``, on the coarsest grid needed
    to fit the model input (never finer than the job's)."""
    region = plan.region
    x, x2 = _axis(box.x, box.x2, side, region.x, region.x2)
    y, y2 = _axis(box.y, box.y2, side, region.y, region.y2)
    level0 = Rect(x, y, x2 - x, y2 - y)
    downsample = plan.downsample
    if max(level0.w, level0.h) > plan.tile_size * downsample:
        downsample = max(level0.w, level0.h) / (plan.tile_size - 1)  # one grid pixel of rounding room
    grid = to_grid(level0, downsample)
    return TileSpec(index=0, count=1, window=grid, core=grid, downsample=downsample,
                    level=source.best_level(downsample), prompt_indices=(0,))


def _touches_inner_border(detection: Detection, tile: TileSpec, region: Rect) -> bool:
    d, window = tile.downsample, tile.window
    x, y = round(detection.origin[0] / d), round(detection.origin[1] / d)
    h, w = detection.mask.shape
    grid_region = to_grid(region, d)
    return ((x <= window.x and window.x > grid_region.x) or (y <= window.y and window.y > grid_region.y)
            or (x + w >= window.x2 and window.x2 < grid_region.x2) or (y + h >= window.y2 and window.y2 < grid_region.y2))


def _box_prompt_sidecar(sidecar: Sidecar, box: Rect) -> Sidecar:
    """The job's sidecar asking for one mask in ``box`` (level-0)."""
    prompt = Prompt(bbox=(float(box.x), float(box.y), float(box.x2), float(box.y2)))
    return sidecar.model_copy(update={"prompts": [prompt], "automask": None, "output_type": None,
                                      "multimask_output": False})


def _best_match(detections: list[Detection], look: SecondLook) -> Detection | None:
    """Of SAM3's objects in the window, the one the look's own mask overlaps best."""
    if look.seen is None:
        box = look.box
        hint = Detection(mask=np.ones((box.h, box.w), bool), score=0.0, origin=(box.x, box.y))
    else:
        hint = look.seen
    reference = _entry(hint, None)
    scored = [(mask_iou(reference, _entry(d, None)), i) for i, d in enumerate(detections)]
    best, index = max(scored, default=(0.0, -1))
    return detections[index] if best > 0 else None


def _look_once(adapter: Any, tile: TileSpec, box: Rect, look: SecondLook, source: RegionSource, job: TileJob,
               progress: ProgressFn) -> Detection | None:
    if job.sidecar.mode == "text":
        return _best_match(run_tile(adapter, replace(tile, prompt_indices=()), source, job, progress), look)
    prompted = replace(job, sidecar=_box_prompt_sidecar(job.sidecar, box))
    return next(iter(run_tile(adapter, tile, source, prompted, progress)), None)


def second_look(adapter: Any, look: SecondLook, source: RegionSource, job: TileJob, plan: LookPlan,
                progress: ProgressFn) -> tuple[Detection, TileSpec] | None:
    """The object segmented whole (and the window that saw it), or None when the model finds nothing there."""
    context = plan.overlap * plan.downsample
    box = _grown(look.box, context, plan.region)
    side = max(box.w, box.h) + 2 * context
    while True:
        tile = window_for(box, side, plan, source)
        found = _look_once(adapter, tile, box, look, source, job, progress)
        if found is None:
            return None
        whole_region = tile.level0().intersection(plan.region) == plan.region
        if whole_region or not _touches_inner_border(found, tile, plan.region):
            template = look.template
            found.prompt_idx, found.mask_idx = template.prompt_idx, template.mask_idx
            found.label = found.label or template.label
            found.color = found.color or template.color
            found.extra = {**template.extra, **found.extra}
            return found, tile
        found_box = Rect(math.floor(found.origin[0]), math.floor(found.origin[1]),
                         math.ceil(found.mask.shape[1] * found.scale), math.ceil(found.mask.shape[0] * found.scale))
        box = _grown(_union(box, found_box), context, plan.region)
        side = max(2 * side, max(box.w, box.h) + 2 * context)
