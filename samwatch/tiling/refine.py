"""Second looks: an object no tile saw whole is segmented again in a window that holds it whole.

The stitcher hands over what it could not finish (:class:`SecondLook`): a fragment cut by its
window that no neighbour confirmed, a union of fragments that still ends at a window border,
or an object larger than ``max_object_pixels``. Each is prompted with a box, its extent (grown
by the overlap towards the sides where it was cut), in a square window around it with context,
at the job's resolution while that fits the model input and coarser (read from the pyramid level
that matches) when the object is larger. While the new mask still touches the window's border,
the box grows to the mask and by half its size, up to the whole region at a downsample that
fits one window. SAM3 (text), which takes no box prompt, runs its text in that window instead and
the object that overlaps the look's own mask best is kept. Looks that fit together in
one window share it (and its one embedding), as prompts do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from samwatch.models.base import Detection, ProgressFn
from samwatch.sidecars.schema import Prompt, Sidecar
from samwatch.media.slides import RegionSource
from samwatch.tiling.once import entry_of, level0_box, mask_iou
from samwatch.tiling.plan import Rect, TileSpec, plan_prompt_windows, to_grid
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


def metadata_of(detection: Detection) -> Detection:
    """``detection`` without its mask: what a second look copies onto the object it finds."""
    return Detection(mask=np.zeros((0, 0), bool), score=detection.score, prompt_idx=detection.prompt_idx,
                     mask_idx=detection.mask_idx, frame=detection.frame, label=detection.label,
                     color=detection.color, extra=dict(detection.extra))


def view(detection: Detection, how: str, level: int) -> Detection:
    """``detection`` with its provenance: which view it is, at which level and downsample."""
    detection.extra = {**detection.extra, "tiling": {"view": how, "level": level, "downsample": detection.scale}}
    return detection


#: A second look's object seen coarser than the job's grid is written on a grid up to that fine
#: (at most this many pixels), its coarse outline smoothed first: on the coarse grid an outline
#: runs straight for several grid pixels (each 3.6 level-0 pixels at a downsample of 3.6), and
#: such a run would read as a cut edge wherever it met a seam. Smoothing by one coarse pixel
#: keeps the object's shape and shortens its straight runs by about the factor of the finer grid.
FINER_GRID_MAX_PIXELS = 16 << 20
COARSE_OUTLINE_SIGMA = 1.0


def on_finer_grid(detection: Detection, downsample: float) -> Detection:
    """``detection`` (placed) on a grid of up to the job's ``downsample``, smoothed from its own."""
    height, width = detection.mask.shape
    factor = min(detection.scale / downsample, math.sqrt(FINER_GRID_MAX_PIXELS / (height * width)))
    if factor < 1.5:
        return detection
    pad = 2  # room for the smoothing outside the object's box
    soft = cv2.GaussianBlur(np.pad(detection.mask, pad).astype(np.float32), (0, 0), COARSE_OUTLINE_SIGMA)
    size = (round((width + 2 * pad) * factor), round((height + 2 * pad) * factor))
    fine = cv2.resize(soft, size, interpolation=cv2.INTER_LINEAR) >= 0.5
    origin = (detection.origin[0] - pad * detection.scale, detection.origin[1] - pad * detection.scale)
    return replace(detection, mask=fine, origin=origin, scale=detection.scale / factor).cropped()


def _grown(box: Rect, by: float, bounds: Rect) -> Rect:
    grown = Rect(math.floor(box.x - by), math.floor(box.y - by), math.ceil(box.w + 2 * by), math.ceil(box.h + 2 * by))
    return grown.intersection(bounds) or box


def touches_inner_border(detection: Detection, tile: TileSpec, region: Rect) -> bool:
    """Whether a placed ``detection`` reaches a border of ``tile``'s window inside the (level-0) ``region``."""
    d, window = tile.downsample, tile.window
    x, y = round(detection.origin[0] / d), round(detection.origin[1] / d)
    h, w = detection.mask.shape
    grid_region = to_grid(region, d)
    return ((x <= window.x and window.x > grid_region.x) or (y <= window.y and window.y > grid_region.y)
            or (x + w >= window.x2 and window.x2 < grid_region.x2) or (y + h >= window.y2 and window.y2 < grid_region.y2))


def _box_prompt(box: Rect) -> Prompt:
    return Prompt(bbox=(float(box.x), float(box.y), float(box.x2), float(box.y2)))


def _box_prompts_sidecar(sidecar: Sidecar, boxes: list[Rect]) -> Sidecar:
    """The job's sidecar asking for one mask in each of ``boxes`` (level-0)."""
    prompts = [_box_prompt(box) for box in boxes]
    return sidecar.model_copy(update={"prompts": prompts, "automask": None, "output_type": None,
                                      "multimask_output": False})


def _best_match(detections: list[Detection], look: SecondLook) -> Detection | None:
    """Of SAM3's objects in the window, the one the look's own mask overlaps best."""
    if look.seen is None:
        box = look.box
        hint = Detection(mask=np.ones((box.h, box.w), bool), score=0.0, origin=(box.x, box.y))
    else:
        hint = look.seen
    reference = entry_of(hint)
    scored = [(mask_iou(reference, entry_of(d)), i) for i, d in enumerate(detections)]
    best, index = max(scored, default=(0.0, -1))
    return detections[index] if best > 0 else None


def _in_window(adapter: Any, tile: TileSpec, members: list[tuple[SecondLook, Rect]], source: RegionSource,
               job: TileJob, progress: ProgressFn) -> list[Detection | None]:
    """What one window (one embedding) finds for each of its looks."""
    mode = job.sidecar.mode
    if mode == "text":
        found = run_tile(adapter, replace(tile, prompt_indices=()), source, job, progress)
        return [_best_match(found, look) for look, _ in members]
    prompted = replace(job, sidecar=_box_prompts_sidecar(job.sidecar, [box for _, box in members]))
    found = run_tile(adapter, replace(tile, prompt_indices=tuple(range(len(members)))), source, prompted, progress)
    by_prompt = {detection.prompt_idx: detection for detection in found}
    return [by_prompt.get(index) for index in range(len(members))]


def _finished(found: Detection, look: SecondLook) -> Detection:
    """What a look found, with the metadata of what the tiles saw."""
    template = look.template
    found.prompt_idx, found.mask_idx = template.prompt_idx, template.mask_idx
    found.label = found.label or template.label
    found.color = found.color or template.color
    found.extra = {**template.extra, **found.extra}
    return found


def second_looks(adapter: Any, looks: list[SecondLook], source: RegionSource, job: TileJob, plan: LookPlan,
                 progress: Any) -> Iterator[tuple[Detection, TileSpec]]:
    """Each look's object segmented whole, with the window that saw it (a look the model finds
    nothing for is dropped). Looks whose windows fit together share one window and one
    embedding; ``progress(done, total, message)`` is told before each window and returns its
    ProgressFn."""
    context = plan.overlap * plan.downsample
    pending = [(look, _grown(look.box, context, plan.region)) for look in looks]
    done = 0
    while pending:
        prompts = [_box_prompt(box) for _, box in pending]
        windows = plan_prompt_windows(prompts, plan.region, plan.tile_size, plan.overlap, plan.downsample,
                                      source.best_level)
        again = []
        for window in windows:
            members = [pending[i] for i in window.prompt_indices]
            answers = _in_window(adapter, window, members, source, job, progress(done, len(looks)))
            whole_region = window.level0().intersection(plan.region) == plan.region
            for (look, box), found in zip(members, answers):
                if found is not None and not whole_region and touches_inner_border(found, window, plan.region):
                    grown = box.union(level0_box(found))
                    again.append((look, _grown(grown, max(context, max(grown.w, grown.h) / 2), plan.region)))
                    continue
                done += 1
                if found is not None:
                    yield _finished(found, look), window
        pending = again
