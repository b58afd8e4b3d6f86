"""One tile (or prompt window) through a model: read its pixels, run the adapter, place the masks.

:func:`run_tile` is a pure unit of work (no state outside its arguments), so an executor may run
tiles as separate tasks and hand their detections to one :class:`~samwatch.tiling.stitch.Stitcher`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samwatch.models.base import Detection, ProgressFn, RunContext
from samwatch.sidecars.schema import Prompt, Sidecar
from samwatch.media.slides import RegionSource
from samwatch.tiling.plan import TileSpec


@dataclass(frozen=True)
class TileJob:
    """What every tile of one job shares."""

    sidecar: Sidecar
    image_key: str  # content identity of the image (and channel rule, frame)
    prompt_batch_size: int = 1
    scratch_dir: Path | None = None
    embedding_store: Any = None  # a TileEmbeddingStore, or None
    memory_budget: int | None = None  # limits.max_job_memory


def read_tile(source: RegionSource, tile: TileSpec) -> np.ndarray:
    """The tile's window as the model sees it: RGB uint8, ``window.h × window.w``."""
    rect = tile.level0()
    pixels = source.read_region(rect.x, rect.y, rect.w, rect.h, level=tile.level)
    width, height = tile.window.w, tile.window.h
    if pixels.shape[:2] != (height, width):  # a level coarser or finer than the grid
        pixels = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), Image.BILINEAR))
    return pixels


def run_tile(adapter: Any, tile: TileSpec, source: RegionSource, job: TileJob, progress: ProgressFn) -> list[Detection]:
    """The tile's detections, each mask cropped to its box and placed in level-0 pixels."""
    sidecar = tile_sidecar(job.sidecar, tile)
    if sidecar is None:
        return []
    ctx = RunContext(
        sidecar=sidecar, image=read_tile(source, tile), image_key=f"{job.image_key}:{tile.geometry_key}",
        progress=progress, prompt_batch_size=job.prompt_batch_size, scratch_dir=job.scratch_dir,
        embedding_store=job.embedding_store, memory_budget=job.memory_budget,
    )
    placed = []
    for detection in adapter.run(ctx):
        moved = place(detection, tile)
        if moved is not None:
            placed.append(moved)
    return placed


def tile_sidecar(sidecar: Sidecar, tile: TileSpec) -> Sidecar | None:
    """The sidecar as the tile sees it: its prompts (or SAM3 exemplar boxes) in window pixels;
    None when the tile has nothing to do (a SAM3 box-only job, no box in this tile)."""
    to_window = _to_window(tile)
    update: dict[str, Any] = {"region": None, "tiling": None}
    if sidecar.mode == "prompts":
        update["prompts"] = [_moved_prompt(sidecar.prompts[i], to_window) for i in tile.prompt_indices]
    elif sidecar.mode == "text":
        rect = tile.level0()
        inside = [
            [box for box in sidecar.boxes_xyxy(positive) if rect.x <= box[0] and rect.y <= box[1]
             and box[2] <= rect.x2 and box[3] <= rect.y2]
            for positive in (True, False)
        ]
        if sidecar.text is None and not inside[0]:
            return None
        update.update(box_format="xyxy", positive_bboxes=[_moved_box(b, to_window) for b in inside[0]],
                      negative_bboxes=[_moved_box(b, to_window) for b in inside[1]])
    return sidecar.model_copy(update=update)


def _to_window(tile: TileSpec) -> Callable[[float, float], tuple[float, float]]:
    d, ox, oy = tile.downsample, tile.window.x, tile.window.y
    return lambda x, y: (x / d - ox, y / d - oy)


def _moved_box(box: tuple[float, float, float, float], to_window: Callable) -> tuple[float, float, float, float]:
    x1, y1 = to_window(box[0], box[1])
    x2, y2 = to_window(box[2], box[3])
    return (x1, y1, x2, y2)


def _moved_prompt(prompt: Prompt, to_window: Callable) -> Prompt:
    return prompt.model_copy(update={
        "bbox": _moved_box(prompt.bbox, to_window) if prompt.bbox is not None else None,
        "points": [to_window(x, y) for x, y in prompt.points],
    })


def place(detection: Detection, tile: TileSpec) -> Detection | None:
    """``detection`` (a mask in the tile's window, at its ``origin`` there) cropped to its box and
    placed in level-0 pixels; its prompt index back in the sidecar's numbering. None for an empty mask."""
    rows = np.flatnonzero(detection.mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(detection.mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    d = tile.downsample
    wx, wy = tile.window.x + detection.origin[0], tile.window.y + detection.origin[1]
    detection.mask = np.ascontiguousarray(detection.mask[y0:y1, x0:x1])
    detection.origin = ((wx + x0) * d, (wy + y0) * d)
    detection.scale = d
    if detection.prompt_idx is not None and tile.prompt_indices:
        detection.prompt_idx = tile.prompt_indices[detection.prompt_idx]
    _place_extra(detection.extra, tile)
    return detection


def _place_extra(extra: dict[str, Any], tile: TileSpec) -> None:
    """Automask's ``point_coords`` and ``crop_box`` from window to level-0 pixels."""
    d, ox, oy = tile.downsample, tile.window.x, tile.window.y
    if "point_coords" in extra:
        x, y = extra["point_coords"]
        extra["point_coords"] = [(ox + x) * d, (oy + y) * d]
    if "crop_box" in extra:
        x1, y1, x2, y2 = extra["crop_box"]
        extra["crop_box"] = [(ox + x1) * d, (oy + y1) * d, (ox + x2) * d, (oy + y2) * d]
