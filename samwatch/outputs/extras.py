"""What a result writes besides its GeoJSON: the preview and the label image.

:func:`result_extras` renders both from the job's shapes (``outputs/shapes.py``), in the
worker that ran the job; the bytes travel in the job's ``Outcome`` and ``JobOutputs.done``
writes them atomically with the result (so any executor works, local or remote).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loguru import logger

from samwatch.config import OutputSettings
import numpy as np

from samwatch.media.read import Media
from samwatch.control.outbox import LABELS_CSV_SUFFIX, LABELS_SUFFIX, PREVIEW_SUFFIX
from samwatch.outputs.labels import labels_csv, write_labels
from samwatch.outputs.preview import PromptMark, View, encode_png, features_view, render_preview
from samwatch.outputs.shapes import Shape, drawable
from samwatch.sidecars.schema import OutputSpec, Sidecar


@dataclass(frozen=True)
class OutputPlan:
    """The extras one result gets: the config's ``output`` with the sidecar's overrides."""

    preview: bool = True
    preview_size: int = 1024
    labels: bool = False

    @classmethod
    def resolve(cls, settings: OutputSettings, spec: OutputSpec) -> OutputPlan:
        formats = spec.formats if spec.formats is not None else settings.formats
        return cls(
            preview=settings.preview if spec.preview is None else spec.preview,
            preview_size=spec.preview_size or settings.preview_size,
            labels="labels" in formats,
        )


def describe_prompt(sidecar: Sidecar, prompt_idx: int | None) -> str:
    """What made a feature, for the labels CSV: its prompt, or the job's kind."""
    if prompt_idx is not None and 0 <= prompt_idx < len(sidecar.prompts):
        prompt = sidecar.prompts[prompt_idx].model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        return json.dumps(prompt, separators=(",", ":"))
    if sidecar.mode == "text":
        return f"text: {sidecar.text}" if sidecar.text else "exemplar boxes"
    return sidecar.mode


def prompt_marks(sidecar: Sidecar) -> list[PromptMark]:
    """The sidecar's box and point prompts, as the preview draws them."""
    marks = []
    for prompt in sidecar.prompts:
        if prompt.bbox is not None:
            marks.append(PromptMark(box=tuple(float(v) for v in prompt.bbox)))
        labels = prompt.point_labels or [1] * len(prompt.points)
        marks.extend(PromptMark(point=(float(x), float(y)), label=label) for (x, y), label in zip(prompt.points, labels))
    return marks


def preview_view(media: Media, sidecar: Sidecar, shapes: Sequence[Shape], marks: Sequence[PromptMark]) -> View | None:
    """What the preview shows: the job's region; on a slide without one, the features' extent
    (a 1024-px overview of a whole slide would show 50-px features as a dot); else the image."""
    if sidecar.region is not None:
        x, y, w, h = sidecar.region
        return (x, y, min(media.width, x + w), min(media.height, y + h))
    if media.kind == "slide":
        return features_view(shapes, marks, media.width, media.height)
    return None


def preview_frames(media: Media, size: int, view: View | None) -> Callable[[int], np.ndarray]:
    """Plane reader for the preview's ``view``: a slide's comes from its coarsest level that is
    still at least ``size`` a side, never from decoding the slide whole, through the job's open
    reader (its limits and channel rule)."""
    x0, y0, x1, y1 = view or (0, 0, media.width, media.height)
    reader = media.region
    if reader is None:
        return lambda plane: media.frame(plane)[y0:y1, x0:x1]

    def overview(_plane: int) -> np.ndarray:
        level = reader.best_level(max(x1 - x0, y1 - y0) / size)
        return reader.read_region(x0, y0, x1 - x0, y1 - y0, level=level)

    return overview


def result_extras(
    shapes: Sequence[Shape], media: Media, sidecar: Sidecar, plan: OutputPlan, *, frame_axis: str = "T"
) -> dict[str, bytes]:
    """suffix -> content of the extra files ``plan`` asks for (none for a plain result);
    ``frame_axis`` (T or Z): what a stack's planes are called.

    The label image is rasterised tile by tile into its compressed bytes, so memory follows
    the compressed size (mostly background: small even for slides), not the pixel count.
    """
    if not (plan.preview or plan.labels):
        return {}
    shapes = drawable(shapes)
    extras: dict[str, bytes] = {}
    if plan.preview and shapes:
        try:
            marks = prompt_marks(sidecar)
            view = preview_view(media, sidecar, shapes, marks)
            sheet = render_preview(
                shapes, preview_frames(media, plan.preview_size, view), width=media.width, height=media.height,
                n_frames=media.n_frames, size=plan.preview_size, filled=sidecar.mode == "automask",
                plane_letter=frame_axis.lower(), view=view, prompts=marks,
            )
            extras[PREVIEW_SUFFIX] = encode_png(sheet)
        except Exception as exc:  # a picture for people must not cost them the result
            logger.opt(exception=exc).warning(f"preview of {media.path.name} skipped: {exc!r}")
    if plan.labels:
        tiff = io.BytesIO()
        write_labels(tiff, shapes, width=media.width, height=media.height, n_planes=media.n_frames,
                     plane_axis=frame_axis)
        extras[LABELS_SUFFIX] = tiff.getvalue()
        extras[LABELS_CSV_SUFFIX] = labels_csv(shapes, lambda index: describe_prompt(sidecar, index))
    return extras
