"""A tile as a unit of work that can run on another worker: small to send, small to return.

A :class:`TileUnit` carries what :func:`~samwatch.tiling.tile.run_tile` needs, by value: where
the image is and how it is read (path, frame, channel rule, limits), the job's shared tile
parameters and the weights to load. :func:`run_tile_unit` reopens the image where it runs and
takes the model from that worker's pool (the ``place`` an executor's unit mapper hands it), and
returns the tile's detections with their masks already cropped to their boxes. Each worker
thread keeps the last image it opened, so the next tile of the same job does not decode a
whole ordinary image again (a slide is read lazily anyway).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samwatch.media.read import ChannelRule, MediaLimits, open_region_source, probe
from samwatch.media.slides import ArraySource, RegionSource
from samwatch.models.base import Detection
from samwatch.tiling.plan import Rect, TileSpec
from samwatch.tiling.tile import TileJob, run_tile, tile_sidecar
from samwatch.vocab import LoadSpec

if TYPE_CHECKING:
    from samwatch.executors.base import Place


@dataclass(frozen=True)
class TileWork:
    """What every tile of one frame of a job shares."""

    path: Path  # the image as the workers see it
    frame: int
    slide: bool  # read lazily region by region; otherwise the frame is decoded whole
    limits: MediaLimits
    channels: ChannelRule
    job: TileJob  # no scratch folder: that is the job's own worker's
    spec: LoadSpec

    def open(self) -> RegionSource:
        """The frame behind the region API, opened where the unit runs."""
        if self.slide:
            return open_region_source(self.path, limits=self.limits, channels=self.channels)
        media = probe(self.path, limits=self.limits, channels=self.channels)
        return ArraySource(self.path, media.frame(self.frame), self.limits)


@dataclass(frozen=True)
class TileUnit:
    work: TileWork
    tile: TileSpec


@dataclass
class TileResult:
    detections: list[Detection]  # masks cropped to their boxes, in level-0 pixels
    encoded: bool  # the encoder ran (no embedding was cached)
    worker: str  # where it ran


_opened = threading.local()  # this thread's last source: (its work key, the source)


def run_tile_unit(unit: TileUnit, place: Place) -> TileResult:
    """``unit``'s tile through the model of ``place`` (an executor's worker)."""
    work = unit.work
    if tile_sidecar(work.job.sidecar, unit.tile) is None:  # nothing to do here: no model to load for it
        return TileResult([], False, place.worker)
    adapter = place.pool.get(work.spec)
    encoded = False

    def progress(stage: str, fraction: float, message: str = "") -> None:  # the job reports per tile
        nonlocal encoded
        encoded = encoded or stage == "encoding image"

    detections = run_tile(adapter, unit.tile, _source(work), work.job, progress)
    return TileResult(detections, encoded, place.worker)


def _source(work: TileWork) -> RegionSource:
    key = (work.path, work.frame, work.job.image_key)
    last: tuple[Any, RegionSource] | None = getattr(_opened, "last", None)
    if last is not None and last[0] == key:
        return last[1]
    if last is not None:
        last[1].close()
    source = work.open()
    _opened.last = (key, source)
    return source


@dataclass(frozen=True)
class TileSpread:
    """A job's way to send its windows out: the executor's unit mapper and what its tiles share."""

    units: Any  # an executors.base.UnitMapper
    work: TileWork

    def worth(self, tiles: list[TileSpec]) -> bool:
        return self.units.spreads(len(tiles))

    def run(self, tiles: list[TileSpec]) -> Iterator[TileResult]:
        return map_tile_units(self.units, [TileUnit(self.work, tile) for tile in tiles])


def map_tile_units(units: Any, tile_units: list[TileUnit]) -> Iterator[TileResult]:
    """Each unit through the executor's unit mapper, results in the units' order."""
    return units.map_units(run_tile_unit, tile_units)


def whole_frame(width: int, height: int, prompts: int) -> TileSpec:
    """One plane of a stack as a unit: a window that is the whole image, owning all its prompts."""
    rect = Rect(0, 0, width, height)
    return TileSpec(0, 1, rect, rect, 1.0, 0, tuple(range(prompts)))
