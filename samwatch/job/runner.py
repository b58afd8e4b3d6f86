"""Running one job: sidecar -> image -> model -> features -> outbox.

``run_job`` is the whole pipeline of one job; every failure inside it becomes that job's
``Outcome`` (a ``JobError`` with its stable code, or ``internal_error`` with the traceback in
the log) and never escapes to the daemon.
"""

from __future__ import annotations

import platform
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from samwatch import __version__
from samwatch.config import Config
from samwatch.errors import JobCancelled, JobError
from samwatch.geometry.outline import mask_to_geometry
from samwatch.geometry.raster import polygons_of
from samwatch.job.inputs import channel_rule, load_ticket_sidecar, media_limits, open_media, ticket_image
from samwatch.media.read import Media
from samwatch.media.slides import ArraySource
from samwatch.models.base import Detection, RunContext
from samwatch.models.device import default_prompt_batch_size, describe
from samwatch.models.pool import ModelPool
from samwatch.outputs.extras import OutputPlan, result_extras
from samwatch.outputs.geojson import result_collection
from samwatch.outputs.shapes import Shape, class_color
from samwatch.job.prompts import prompt_masks
from samwatch.job.scratch import job_scratch
from samwatch.sidecars.load import JobSidecar
from samwatch.sidecars.qupath import Imported, Source, import_annotations, read_export
from samwatch.sidecars.schema import Sidecar
from samwatch.tiling.cache import TileEmbeddingStore, weights_identity
from samwatch.tiling.segment import TilingReport, is_tiled, plan_for, segment
from samwatch.tiling.tile import TileJob
from samwatch.tiling.units import TileSpread, TileUnit, TileWork, map_tile_units, whole_frame
from samwatch.vocab import JobTicket, LoadSpec, Outcome, Progress


@dataclass
class Prepared:
    """A job between its phases: what reading found, then what the device run added."""

    ticket: JobTicket
    progress: Progress
    sidecar: Sidecar
    model_type: str
    weights_name: str
    image_rel: str
    media: Media
    spec: LoadSpec
    pixels: np.ndarray | None  # a single image, already read and converted to RGB
    timings: dict[str, float]
    started: float
    adapter: Any = None
    encoder: str = "eager"  # what encoded the image, for provenance
    decoder: str = "eager"  # what decoded its prompts
    provenance: dict[str, Any] = field(default_factory=dict)  # e.g. the tiling report
    sources: list[Source | None] | None = None  # the QuPath object of each prompt, when imported


def outcome_of_error(ticket: JobTicket, exc: Exception) -> Outcome:
    """What any failure inside a job becomes: its outcome, never an exception for the daemon."""
    if isinstance(exc, JobCancelled):
        return Outcome("cancelled", error=exc)
    if isinstance(exc, JobError):
        return Outcome("failed", error=exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return Outcome("failed", error=JobError(
            "out_of_memory",
            "The device ran out of memory for this job; use a smaller model, fewer frames or prompts, or device: cpu.",
        ))
    if isinstance(exc, OSError):  # the share or the disk, not the job: worth another try (retries.py)
        return Outcome("failed", error=JobError(
            "io_error",
            f"Reading this job's files failed ({exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}); "
            "samwatch tries again by itself after a while. If it persists, check the share or disk.",
        ))
    # a bug must fail its job, never the daemon
    logger.error(f"job {ticket.job_id} internal error: {exc!r}\n{''.join(traceback.format_exception(exc))}")
    return Outcome("failed", error=JobError(
        "internal_error",
        f"samwatch failed unexpectedly ({type(exc).__name__}: {str(exc)[:200]}); the log has the details. "
        "Please report it with the sidecar.",
    ))


class JobRunner:
    """Runs jobs for one daemon; owns the model pool (used from the worker thread only)."""

    def __init__(
        self, config: Config, registry: Any, pool: ModelPool, prompt_batch_size: int | None = None,
        worker: dict[str, str] | None = None, units: Any = None, *, sidecar: JobSidecar | None = None,
    ) -> None:
        """``prompt_batch_size`` None: chosen per device (models/device.py); ``worker``: who runs
        the jobs, for their provenance (executors/base.py ``worker_identity``); ``units``: the
        executor's ``UnitMapper`` a tiled job's windows may spread over (None: they run here);
        ``sidecar``: the sidecar of the one job this runner runs, as discovery parsed it in this
        process (executors/base.py ``Dispatch``); without it a job parses its ticket's bytes."""
        self.worker = worker
        self.units = units
        self.sidecar = sidecar
        self.config = config
        self.registry = registry
        self.pool = pool
        self.prompt_batch_size = prompt_batch_size or default_prompt_batch_size(pool.device)

    def run(self, ticket: JobTicket, progress: Progress) -> Outcome:
        """The three phases of a job one after another (pipeline.py overlaps them across jobs)."""
        started = time.perf_counter()
        try:
            prepared = self.prepare(ticket, progress)
            outcome = prepared if isinstance(prepared, Outcome) else self.finish(prepared, self.infer(prepared))
        except Exception as exc:
            outcome = outcome_of_error(ticket, exc)
        outcome.seconds = time.perf_counter() - started
        return outcome

    # ---- the pipeline -----------------------------------------------------------------

    def prepare(self, ticket: JobTicket, progress: Progress) -> Prepared | Outcome:
        """Phase 1, CPU: sidecar, image opened (a single image read and converted), weights
        requested; an ``Outcome`` when the job must wait for its weights."""
        started = time.perf_counter()
        progress("reading", 0.0)
        loaded = self.sidecar if self.sidecar is not None else load_ticket_sidecar(self.config, ticket)
        self.pool.adapter_for(loaded.model_type)  # a missing model package fails before the image is read
        image_rel = ticket_image(ticket)
        media = open_media(self.config.limits, self.config.inbox / image_rel, image_rel, loaded.sidecar)
        try:
            return self._prepared(ticket, progress, loaded, media, image_rel, started)
        except BaseException:
            media.close()
            raise

    def _prepared(
        self, ticket: JobTicket, progress: Progress, loaded: JobSidecar, media: Media, image_rel: str, started: float,
    ) -> Prepared | Outcome:
        """The rest of phase 1, once the image is open (it is closed by ``finish``, or here when
        the job waits for its weights)."""
        sidecar, model_type, weights_name = loaded.sidecar, loaded.model_type, loaded.weights_name
        imported = self._imported(loaded, media)
        sidecar = imported.sidecar if imported else sidecar
        if imported and imported.report["warnings_total"]:
            logger.warning(f"job {ticket.job_id}: {imported.report['warnings_total']} features of "
                           f"{loaded.annotations_rel} cannot be prompts and are skipped (samwatch.annotations.warnings)")
        whole_image = media.n_frames == 1 and sidecar.mode != "video" and not is_tiled(
            sidecar, media.width, media.height, max_image_pixels=self.config.limits.max_image_pixels)
        pixels = media.frame(0) if whole_image else None
        timings = {"read": time.perf_counter() - started}

        spec = self.registry.request(model_type, weights_name)
        if not isinstance(spec, LoadSpec):
            if spec.error is not None:
                raise spec.error
            media.close()
            return Outcome("waiting", waiting_for=(model_type, weights_name))
        return Prepared(ticket, progress, sidecar, model_type, weights_name, image_rel, media, spec, pixels,
                        timings, started, provenance={"annotations": imported.report} if imported else {},
                        sources=imported.sources if imported else None)

    def _imported(self, loaded: JobSidecar, media: Media) -> Imported | None:
        """The sidecar's QuPath export read into prompts, now that the image's size is known."""
        rel = loaded.annotations_rel
        if rel is None:
            return None
        features = read_export(self.config.inbox / rel, rel, self.config.limits)
        return import_annotations(loaded.sidecar, features, rel, media.width, media.height)

    def infer(self, job: Prepared) -> Iterator[Detection]:
        """Phase 2, the device: the model loaded and run; detections as they come (each mask
        becomes its feature and is dropped, so a job holds one prompt batch of masks at a time)."""
        # A first load can take a while (a CPU's ONNX export): say so, or the job looks stuck.
        job.progress("loading model", 0.0, "" if self.pool.holds(job.spec) else
                     f"loading {job.spec.model_type} (its first job here; on a CPU the encoder is exported to ONNX "
                     "once per weights, up to a minute)")
        load_started = time.perf_counter()
        job.adapter = self.pool.get(job.spec)
        job.timings["load"] = time.perf_counter() - load_started
        with job_scratch() as scratch:
            yield from self._infer(job, scratch)
        job.encoder = job.adapter.encoder_path  # before another job can use it
        job.decoder = job.adapter.decoder_path

    def finish(self, job: Prepared, detections: Iterable[Detection]) -> Outcome:
        """Phase 3, CPU: shapes traced as detections arrive, then written: the GeoJSON and the extras; the image closed."""
        try:
            return self._finish(job, detections)
        finally:
            job.media.close()

    def _finish(self, job: Prepared, detections: Iterable[Detection]) -> Outcome:
        traced_started = time.perf_counter()
        shapes = self._features(detections, job.sidecar, job.model_type, job.media, job.timings, job.sources)
        timings = job.timings
        timings["inference"] = time.perf_counter() - traced_started - timings["geometry"] - timings.get("load", 0.0)
        job.progress("writing", 0.0)
        timings["total"] = time.perf_counter() - job.started
        meta = self._meta(job, timings, len(shapes)) | job.provenance
        media = job.media
        extras = result_extras(
            shapes, media, job.sidecar, OutputPlan.resolve(self.config.output, job.sidecar.output),
            frame_axis=_frame_axes(job.sidecar, media)[-1],
        )
        summary = (
            f"job {job.ticket.job_id} done model={job.model_type} weights={job.weights_name} "
            f"size={media.width}x{media.height}{'x' + str(media.n_frames) if media.n_frames > 1 else ''} "
            f"features={len(shapes)} seconds={timings['total']:.2f}"
        )
        return Outcome("done", features=len(shapes), summary=summary, result=result_collection(shapes, meta),
                       extras=extras)

    def _infer(self, job: Prepared, scratch: Path) -> Iterator[Detection]:
        adapter, sidecar, media, ticket, progress = job.adapter, job.sidecar, job.media, job.ticket, job.progress
        base_key = f"{ticket.image_sha or ticket.image}:{sidecar.channels}:{sidecar.normalize}"
        # The model is loaded: say what runs now, even if the adapter's first report comes late.
        progress("frames" if sidecar.mode != "video" and media.n_frames > 1 else _OPENING_STAGE[sidecar.mode], 0.0)
        if sidecar.mode == "video":
            if sidecar.region is not None or sidecar.tiling is not None:
                raise JobError("sidecar_invalid", "region and tiling are for images, not for tracking through frames.",
                               file=ticket.sidecar, field="region" if sidecar.region is not None else "tiling")
            ctx = RunContext(sidecar=sidecar, image=None, image_key=base_key, frames=media, progress=progress,
                             prompt_batch_size=self.prompt_batch_size, scratch_dir=scratch,
                             memory_budget=self.config.limits.max_job_memory)
            yield from adapter.run(ctx)
            return
        if is_tiled(sidecar, media.width, media.height, max_image_pixels=self.config.limits.max_image_pixels):
            yield from self._infer_tiled(adapter, sidecar, media, base_key, progress, scratch, job.spec, job.provenance)
            return
        masks = prompt_masks(sidecar.prompts, inbox=self.config.inbox, sidecar_rel=ticket.sidecar or "",
                             image_hw=(media.height, media.width)) if sidecar.mode == "prompts" else []
        if self.units is not None and all(m is None for m in masks) and self.units.spreads(media.n_frames):
            yield from self._spread_frames(job, base_key)
            return
        for frame_index in range(media.n_frames):
            # A stack without a video block: every plane is segmented as an image.
            frame_progress = progress if media.n_frames == 1 else _frame_progress(progress, frame_index, media.n_frames)
            ctx = RunContext(
                sidecar=sidecar, image=job.pixels if job.pixels is not None else media.frame(frame_index),
                image_key=f"{base_key}:{frame_index}",
                prompt_masks=masks, progress=frame_progress, prompt_batch_size=self.prompt_batch_size,
                scratch_dir=scratch, memory_budget=self.config.limits.max_job_memory,
            )
            for detection in adapter.run(ctx):
                if media.n_frames > 1:
                    detection.frame = frame_index
                yield detection

    def _spread_frames(self, job: Prepared, base_key: str) -> Iterator[Detection]:
        """The planes of a stack over the cluster's workers, each a unit, results in the planes'
        order (``plane 3 of 40 on worker``); closing early (a cancel) cancels the planes not yet run."""
        sidecar, media = job.sidecar, job.media
        tile = whole_frame(media.width, media.height, len(sidecar.prompts) if sidecar.mode == "prompts" else 0)
        units = [TileUnit(self._tile_work(sidecar, media, base_key, index, job.spec), tile)
                 for index in range(media.n_frames)]
        workers: Counter[str] = Counter()
        with closing(map_tile_units(self.units, units)) as results:
            for index, result in enumerate(results):
                workers[result.worker] += 1
                job.progress("frames", (index + 1) / media.n_frames, f"plane {index + 1} of {media.n_frames} on {result.worker}")
                for detection in result.detections:
                    detection.frame = index
                    yield detection
        job.provenance["frame_workers"] = dict(workers)

    def _infer_tiled(
        self, adapter: Any, sidecar: Sidecar, media: Media, base_key: str, progress: Progress, scratch: Path,
        spec: LoadSpec, provenance: dict[str, Any],
    ) -> Iterator[Detection]:
        """A job on part of an image, or on one larger than a window (samwatch.tiling): its
        detections as each tile's become final, masks cropped to their boxes."""
        store = TileEmbeddingStore(
            self.config.state_dir / "tile-embeddings", f"{spec.model_type}:{weights_identity(spec)}",
            self.config.models.tile_embedding_cache_mb * 1024 * 1024,
        )
        report: TilingReport | None = None
        for frame_index in range(media.n_frames):
            work = self._tile_work(sidecar, media, base_key, frame_index, spec, store)
            job = work.job
            spread = TileSpread(self.units, work) if self.units is not None else None
            with self._frame_source(media, frame_index) as source:
                plan = plan_for(sidecar, source)
                report = report or TilingReport(plan)
                frame_progress = progress if media.n_frames == 1 else _frame_progress(progress, frame_index, media.n_frames)
                for detection in segment(adapter, source, replace(job, scratch_dir=scratch), plan, frame_progress,
                                         report, max_object_pixels=self.config.limits.max_image_pixels, spread=spread):
                    if media.n_frames > 1:
                        detection.frame = frame_index
                    yield detection
        if report is not None:
            provenance["tiling"] = report.to_dict()

    def _tile_work(
        self, sidecar: Sidecar, media: Media, base_key: str, index: int, spec: LoadSpec,
        store: TileEmbeddingStore | None = None,
    ) -> TileWork:
        """What the windows of frame ``index`` share, wherever they run."""
        job = TileJob(sidecar=sidecar, image_key=f"{base_key}:{index}", prompt_batch_size=self.prompt_batch_size,
                      embedding_store=store, memory_budget=self.config.limits.max_job_memory)
        return TileWork(media.path, index, media.kind == "slide", media_limits(self.config.limits),
                        channel_rule(sidecar), job, spec)

    def _frame_source(self, media: Media, index: int) -> Any:
        """Frame ``index`` behind the region API: a slide read lazily (the job's open reader,
        closed with the job), other images decoded."""
        if media.region is not None:
            return nullcontext(media.region)
        return ArraySource(media.path, media.frame(index), media_limits(self.config.limits))

    def _features(
        self, detections: Iterable[Detection], sidecar: Sidecar, model_type: str, media: Media,
        timings: dict[str, float], sources: list[Source | None] | None = None,
    ) -> list[Shape]:
        """One shape per non-empty detection, traced as it arrives; ``timings["geometry"]``
        gets the time spent tracing. A prompt made from a QuPath object links back to it."""
        default_label = sidecar.label or self.config.defaults.label
        axes = _frame_axes(sidecar, media)
        plane_position = sidecar.video.plane_position if sidecar.video else 0
        shapes: list[Shape] = []
        timings["geometry"] = 0.0
        for detection in detections:
            traced = time.perf_counter()
            geometry = mask_to_geometry(
                detection.mask, simplify_tolerance=sidecar.output.simplify_tolerance,
                offset=detection.origin, scale=detection.scale, arrays=True,
            )
            timings["geometry"] += time.perf_counter() - traced
            if geometry is None:
                continue
            label = detection.label or default_label
            color = detection.color or sidecar.color or class_color(label)
            zt = None
            if detection.frame is not None:
                zt = (detection.frame, plane_position) if axes == "XYZ" else (plane_position, detection.frame)
            extra = dict(detection.extra)
            source = sources[detection.prompt_idx] if sources and detection.prompt_idx is not None else None
            if source is not None:
                extra.update(source.properties(sidecar.annotations.file if sidecar.annotations else ""))
            shapes.append(Shape(
                polygons=tuple(tuple(polygon) for polygon in polygons_of(geometry)), name=label,
                color=(int(color[0]), int(color[1]), int(color[2])),
                object_idx=detection.obj_id if detection.obj_id is not None else len(shapes), index=len(shapes),
                quality=float(detection.score), model=model_type,
                object_type=sidecar.output.object_type or self.config.output.object_type,
                prompt_idx=detection.prompt_idx,
                mask_idx=detection.mask_idx if sidecar.mask_choice != "single" else None,
                obj_id=detection.obj_id, frame=detection.frame, zt=zt, extra=extra,
            ))
        return shapes

    def _meta(self, job: Prepared, timings: dict[str, float], n_features: int) -> dict[str, Any]:
        ticket, sidecar, spec, media = job.ticket, job.sidecar, job.spec, job.media
        return {
            "version": __version__,
            "job": ticket.job_id,
            "model": spec.model_type,
            "weights": {
                "name": spec.weights_name, "sha256": spec.sha256, "source": spec.source,
                "config": job.adapter.config_used or spec.config,
            },
            "device": describe(self.pool.device),
            "image_encoder": job.encoder,  # e.g. onnxruntime, sdpa+bf16, or eager
            "mask_decoder": job.decoder,  # onnxruntime or eager
            "host": self.config.service.instance,
            **({"worker": self.worker} if self.worker else {}),
            "image": {
                "path": job.image_rel, "sha256": ticket.image_sha, "width": media.width, "height": media.height,
                "frames": media.n_frames, "axes": media.axes, "dtype": media.source_dtype,
                **({"slide": media.slide} if media.slide else {}),
            },
            "sidecar": ticket.sidecar,
            "input_version": ticket.version,
            # Prompts made from a QuPath export are that export, not repeated here.
            "parameters": sidecar.model_dump(mode="json", exclude_none=True,
                                             exclude={"prompts"} if job.sources is not None else None),
            "features": n_features,
            "timings": {key: round(value, 4) for key, value in timings.items()},
            "python": platform.python_version(),
            "torch": torch.__version__,
        }


_OPENING_STAGE = {"prompts": "encoding image", "text": "encoding image", "automask": "automask", "video": "tracking"}


def _frame_axes(sidecar: Sidecar, media: Media) -> str:
    """XYT or XYZ: which axis a stack's frames run along."""
    if sidecar.video:
        return sidecar.video.axes
    return "XYZ" if "Z" in media.axes and "T" not in media.axes else "XYT"


def _frame_progress(progress: Progress, index: int, total: int) -> Callable[[str, float], None]:
    def report(stage: str, fraction: float, message: str = "") -> None:
        progress("frames", (index + fraction) / total, f"plane {index + 1} of {total}: {stage}")

    return report
