"""tifffile: TIFF, OME-TIFF, ImageJ hyperstacks; ``series[0]``, one frame's pages at a time.

Which axis is the frame axis is the rule in ``media.read``'s docstring. Pages compressed with a codec
tifffile lacks without ``imagecodecs`` are decoded by Pillow, when each page is plain ``YX``/``YXS``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from samwatch.errors import JobError
from samwatch.media.limits import MediaLimits, check_pixels
from samwatch.media.pil import pil_open
from samwatch.media.source import Opened, reading


def _ravel(index: Sequence[int], sizes: Sequence[int]) -> int:
    flat = 0
    for i, size in zip(index, sizes):
        flat = flat * size + i
    return flat


def _unravel(flat: int, sizes: Sequence[int]) -> tuple[int, ...]:
    index = []
    for size in reversed(sizes):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


@dataclass(frozen=True)
class _TiffLayout:
    """Where a frame's pixels sit in a tifffile series (axes and shape are squeezed)."""

    axes: str
    shape: tuple[int, ...]
    n_lead: int  # leading axes stored as separate pages; the rest lie within one page
    frame_axes: tuple[int, ...]
    fixed: tuple[tuple[int, int], ...]  # (axis position, index) held constant

    @property
    def n_frames(self) -> int:
        return math.prod(self.shape[p] for p in self.frame_axes)

    @property
    def n_channels(self) -> int:
        return math.prod(s for s, a in zip(self.shape, self.axes) if a in "CS")

    def picked(self, frame: int) -> dict[int, int]:
        """Axis position -> index for every axis that is not Y, X or a channel."""
        sizes = [self.shape[p] for p in self.frame_axes]
        return dict(self.fixed) | dict(zip(self.frame_axes, _unravel(frame, sizes)))

    def pages(self, picked: dict[int, int]) -> tuple[list[int], tuple[int, ...]]:
        """The series' page numbers holding those pixels, and their leading shape."""
        lead = self.shape[: self.n_lead]
        ranges = [(picked[p],) if p in picked else range(lead[p]) for p in range(self.n_lead)]
        return [_ravel(i, lead) for i in itertools.product(*ranges)], tuple(map(len, ranges))

    def to_hwc(self, data: np.ndarray, picked: dict[int, int], lead: tuple[int, ...]) -> np.ndarray:
        data = data.reshape(lead + self.shape[self.n_lead :])
        # Picked leading axes were read at one index; picked in-page axes still need indexing.
        data = data[tuple(
            (0 if p < self.n_lead else picked[p]) if p in picked else slice(None)
            for p in range(len(self.axes)))]
        kept = [a for p, a in enumerate(self.axes) if p not in picked]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "CS"]
        data = data.transpose(order)
        return data.reshape(data.shape[0], data.shape[1], -1)


def _tiff_plan(
    path: Path, axes: str, shape: tuple[int, ...], frame_axis: str | None, plane_position: int
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(frame axes, fixed axes) by the module docstring's rule."""
    t, z = axes.find("T"), axes.find("Z")
    others = tuple(p for p, a in enumerate(axes) if a not in "YXCS" and p not in (t, z))
    if t < 0 and z < 0:
        return others, ()
    at_zero = tuple((p, 0) for p in others)
    if t < 0 or z < 0:
        return (t if t >= 0 else z,), at_zero
    main, other = (z, t) if frame_axis == "Z" else (t, z)
    if not 0 <= plane_position < shape[other]:
        raise JobError(
            "sidecar_invalid",
            f"plane_position {plane_position} is outside the {axes[other]} axis of "
            f"'{path.name}', which has {shape[other]} planes; use 0 to {shape[other] - 1}.",
            field="plane_position", file=str(path))
    return (main,), ((other, plane_position),) + at_zero


def _unsupported_tiff(path: Path, why: str) -> JobError:
    return JobError("unsupported_format", f"'{path.name}' {why}; save it again as an "
                    "uncompressed TIFF (for example with Fiji or tifffile).", file=str(path))


@dataclass(frozen=True)
class _TiffSource:
    path: Path
    layout: _TiffLayout
    via_pil: bool  # the pages use a codec tifffile lacks without imagecodecs

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        with reading(self.path), tifffile.TiffFile(self.path) as tif:
            for index in indices:
                picked = self.layout.picked(index)
                pages, lead = self.layout.pages(picked)
                yield self.layout.to_hwc(self._read_pages(tif, pages), picked, lead)

    def _read_pages(self, tif: tifffile.TiffFile, pages: list[int]) -> np.ndarray:
        if not self.via_pil:
            return tif.asarray(key=pages, series=0)
        series = tif.series[0]
        with pil_open(self.path) as im:
            planes = []
            for page in pages:
                im.seek(series.pages[page].index)
                planes.append(np.asarray(im))
        data = np.stack(planes)
        if data.shape[1:] != series.keyframe.shape:
            raise _unsupported_tiff(self.path, f"has pages Pillow decodes as {data.shape[1:]} "
                                    f"instead of {series.keyframe.shape}")
        return data.astype(series.dtype)


def open_tiff(
    path: Path, limits: MediaLimits, frame_axis: str | None, plane_position: int
) -> Opened:
    with reading(path), tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, tuple(series.shape)
        page_shape, n_pages = tuple(series.keyframe.shape), len(series.pages)
        page_axes = axes[len(shape) - len(page_shape):]
        via_pil = series.keyframe.compression not in tifffile.TIFF.DECOMPRESSORS
        dtype = np.dtype(series.dtype)
    n_lead = len(shape) - len(page_shape)
    if "Y" not in axes or "X" not in axes or n_lead < 0 or shape[n_lead:] != page_shape \
            or math.prod(shape[:n_lead]) != n_pages:
        raise _unsupported_tiff(path, f"has a layout samwatch does not understand (axes "
                                f"{axes}, shape {shape})")
    if dtype.kind not in "biuf":
        raise _unsupported_tiff(path, f"holds {dtype} pixels")
    if via_pil and page_axes not in ("YX", "YXS"):
        raise _unsupported_tiff(path, "uses a compression that needs the optional imagecodecs "
                                "package for its page layout")
    width, height = shape[axes.index("X")], shape[axes.index("Y")]
    check_pixels(path, width, height, limits)
    frame_axes, fixed = _tiff_plan(path, axes, shape, frame_axis, plane_position)
    layout = _TiffLayout(axes, shape, n_lead, frame_axes, fixed)
    return Opened(_TiffSource(path, layout, via_pil), width, height, layout.n_frames,
                   layout.n_channels, axes, str(dtype))

