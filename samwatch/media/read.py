"""Images, stacks and videos on disk -> the RGB uint8 frames the models take, plus metadata.

This module knows nothing of models, sidecars or outputs: it opens a file (or a
``name.frames/`` folder), checks it against :class:`MediaLimits` (``media.limits``) from its
header alone, and hands out frames lazily as ``H x W x 3`` ``uint8`` arrays.

Readers
-------
One module per format (``media.pil``, ``media.tiff``, ``media.video``); slides and ``.frames``
folders are opened here, on top of ``media.slides`` and the other readers.

* PNG, JPEG, BMP: Pillow, first frame only (a phone JPEG may carry a second MPO frame, an
  APNG several; both are stills here). EXIF orientation is *not* applied: GeoJSON
  coordinates must match the pixel grid as stored, which is what QuPath displays.
* GIF: Pillow, every frame (a one-frame GIF is a still).
* TIFF (all bit depths, multi-page, OME, ImageJ): tifffile, ``series[0]`` only, one frame's
  pages at a time. Pages compressed with a codec tifffile cannot decode without the
  optional ``imagecodecs`` package (LZW, PackBits, JPEG...) are decoded by Pillow instead,
  as long as each page is a plain ``YX`` or ``YXS`` image.
* MP4, AVI, MOV: PyAV, decoded sequentially on demand (``Media.frames`` is the cheap way to
  walk a video; ``Media.frame(i)`` decodes from the start). The count comes from the
  container, or from one decoding pass when the container does not say.
* Slides (``kind="slide"``): tiled or pyramidal TIFF / OME-TIFF and OpenSlide formats (SVS,
  NDPI, MRXS, SCN, BIF, ...), see :mod:`samwatch.media.slides`. They are checked against
  ``max_slide_pixels`` and read by region (:func:`open_region_source`); ``Media.frame(0)``
  decodes a slide whole only when it fits ``max_image_pixels``.
* ``name.frames/``: every image file in the folder (hidden files skipped), sorted naturally
  (``frame2`` before ``frame10``); each file gives its first frame. All frames must have the
  same size, dtype and channel count.

Which axis is the frame axis (stacks)
-------------------------------------
Axes are tifffile's series axes (``Media.axes``). Y and X are the image plane, C and S the
channels (both present: flattened, C major), everything else selects frames:

* the file has both T and Z: frames run along ``frame_axis`` (``"T"`` when None) and the
  other of the two is fixed at ``plane_position``;
* the file has only one of T or Z: frames run along that one, whatever ``frame_axis`` says;
* any further axis (tifffile's I, Q, R, E, ...) is then fixed at index 0;
* the file has neither T nor Z: frames run over all those further axes, flattened in file
  order, so a plain multi-page TIFF with no metadata (axes ``IYX``) is a stack of pages.

A file with one frame is ``kind="image"``, more than one ``kind="stack"``. Note that a
``C x Y x X`` TIFF written without axes metadata reads as ``QYX``: a stack of pages.
Frames are converted to RGB uint8 by :mod:`samwatch.media.pixels` (``ChannelRule``,
``to_rgb8``). For a stack the stretch bounds are computed once, from up to five frames spread
over it, and used for every frame, so brightness stays comparable over time (a frame the
objects have left is not stretched into noise). A still, and :func:`read_image`, use the
one frame's own bounds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from samwatch.errors import JobError
from samwatch.media.files import (
    FRAMES_DIR_SUFFIX,
    IMAGE_SUFFIXES,
    MEDIA_SUFFIXES,
    TIFF_SUFFIXES,
    frame_files,
    not_found,
)
from samwatch.media.limits import MediaLimits, human_bytes
from samwatch.media.pil import open_pil
from samwatch.media.pixels import ChannelRule, check_channels, needs_stretch, select_channels, stretch_bounds, to_rgb8
from samwatch.media.slides import ArraySource, RegionSource, SlideReader, is_slide, open_slide
from samwatch.media.source import Opened, Source
from samwatch.media.tiff import open_tiff
from samwatch.media.video import AV_SUFFIXES, open_video

_STRETCH_FRAMES = 5


@dataclass
class Media:
    """An opened image, stack or video: metadata now, frames on demand."""

    path: Path
    kind: str
    width: int
    height: int
    n_frames: int
    axes: str
    source_dtype: str
    _source: Source = field(repr=False, compare=False)
    _rule: ChannelRule = field(repr=False, compare=False)
    #: For a slide, its reader's ``describe()`` (reader, vendor, levels, mpp, tile size) for provenance.
    slide: dict[str, Any] | None = None
    #: A slide's reader, open from ``probe`` to ``close`` with the job's limits and channel rule:
    #: the job's tiles and its preview read through it, so a job opens its slide once.
    region: SlideReader | None = field(default=None, repr=False, compare=False)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as RGB uint8 H x W x 3."""
        if not 0 <= index < self.n_frames:
            raise IndexError(f"frame {index} is outside 0..{self.n_frames - 1}")
        (raw,) = self._source.read([index])
        return self._convert(raw)

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Frames ``start`` .. ``stop - 1`` (slice semantics), one at a time."""
        for raw in self._source.read(range(self.n_frames)[start:stop]):
            yield self._convert(raw)

    def close(self) -> None:
        """Release a slide's file (other kinds hold none between reads)."""
        if self.region is not None:
            self.region.close()

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        return to_rgb8(raw, self._rule, channel_axis=-1, bounds=self._stack_bounds)

    @cached_property
    def _stack_bounds(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.n_frames == 1 or not needs_stretch(np.dtype(self.source_dtype), self._rule):
            return None
        picks = np.linspace(0, self.n_frames - 1, min(self.n_frames, _STRETCH_FRAMES))
        indices = sorted({int(round(i)) for i in picks})
        samples = [select_channels(raw, self._rule.channels) for raw in self._source.read(indices)]
        return stretch_bounds(samples, self._rule)


# ---------------------------------------------------------------------------------------
# public entry points


def probe(
    path: Path,
    *,
    limits: MediaLimits = MediaLimits(),
    channels: ChannelRule = ChannelRule(),
    frame_axis: str | None = None,
    plane_position: int = 0,
    max_frames: int | None = None,
) -> Media:
    """Open ``path`` from its header, check the limits, and return it ready to read (close it
    after use: a slide stays open, see ``Media.region``).

    ``frame_axis`` ("T" or "Z") and ``plane_position`` choose the frames of a stack (module
    docstring). ``max_frames`` is how many frames the caller will hold at once (the
    sidecar's ``max_frame_num_to_track``); the memory check uses it when smaller than the
    stack. Pixel errors of a header-valid file surface from ``Media.frame``/``frames``.
    """
    media = _open(Path(path), limits, channels, frame_axis, plane_position)
    held = media.n_frames if max_frames is None else min(media.n_frames, max_frames)
    _check_sequence(media, held, limits)
    return media


def read_image(
    path: Path, *, limits: MediaLimits = MediaLimits(), channels: ChannelRule = ChannelRule()
) -> np.ndarray:
    """A still as RGB uint8; for a multi-frame file its frame 0 (T=0, Z=0), alone."""
    media = _open(Path(path), limits, channels, None, 0)
    try:
        (raw,) = media._source.read([0])
    finally:
        media.close()
    return to_rgb8(raw, channels, channel_axis=-1)


def open_region_source(
    path: Path, *, limits: MediaLimits = MediaLimits(), channels: ChannelRule = ChannelRule()
) -> RegionSource:
    """A still behind the region API: a slide read lazily, any other image decoded once.

    Slides (:func:`samwatch.media.slides.is_slide`) are checked against ``max_slide_pixels`` and
    decode only the tiles each region touches; an ordinary image is decoded whole under
    ``max_image_pixels`` (its frame 0 for a stack) and served from memory. Close it after use.
    """
    path = Path(path)
    if path.is_file() and is_slide(path):
        return open_slide(path, limits=limits, channels=channels)
    return ArraySource(path, read_image(path, limits=limits, channels=channels), limits)


# ---------------------------------------------------------------------------------------
# opening


def _open(
    path: Path, limits: MediaLimits, rule: ChannelRule, frame_axis: str | None, plane_position: int
) -> Media:
    if frame_axis not in (None, "T", "Z"):
        raise ValueError(f"frame_axis must be 'T', 'Z' or None, not {frame_axis!r}")
    opened = _open_any(path, limits, frame_axis, plane_position, slide_rule=rule)
    region = opened.source.reader if isinstance(opened.source, _SlideSource) else None
    try:
        check_channels(rule.channels, opened.n_channels, path)
    except JobError:
        if region is not None:
            region.close()
        raise
    return Media(
        path=path, kind="slide" if opened.slide else "stack" if opened.n_frames > 1 else "image",
        width=opened.width, slide=opened.slide,
        height=opened.height, n_frames=opened.n_frames, axes=opened.axes,
        source_dtype=opened.dtype, _source=opened.source, _rule=rule, region=region)


def _open_any(
    path: Path, limits: MediaLimits, frame_axis: str | None, plane_position: int, *,
    slide_rule: ChannelRule | None = None,
) -> Opened:
    """``slide_rule``: a slide is kept open, read with that rule; None: opened for each read."""
    if not path.exists():
        raise not_found(path)
    if path.is_dir():
        if path.name.lower().endswith(FRAMES_DIR_SUFFIX):
            return _open_folder(path, limits)
        raise JobError("unsupported_format", f"'{path.name}' is a folder; to use its images as "
                       f"frames, rename it to '{path.name}{FRAMES_DIR_SUFFIX}'.", file=str(path))
    suffix = path.suffix.lower()
    if suffix not in MEDIA_SUFFIXES:
        known = ", ".join(sorted(MEDIA_SUFFIXES))
        raise JobError("unsupported_format", f"'{path.name}' is not a type samwatch reads; "
                       f"convert it to one of {known}.", file=str(path))
    if path.stat().st_size == 0:
        raise JobError("image_unreadable", f"'{path.name}' is empty (0 bytes); copy it again "
                       "once it is fully written.", file=str(path))
    if is_slide(path):
        return _open_slide(path, limits, slide_rule)
    if suffix in TIFF_SUFFIXES:
        return open_tiff(path, limits, frame_axis, plane_position)
    if suffix in AV_SUFFIXES:
        return open_video(path, limits)
    return open_pil(path, limits, animated=suffix == ".gif")


def _check_sequence(media: Media, held: int, limits: MediaLimits) -> None:
    need = held * media.width * media.height * 3
    if media.kind == "stack" and need > limits.max_video_bytes:
        raise JobError(
            "video_too_large",
            f"'{media.path.name}' needs {human_bytes(need)} as RGB frames ({held} frames of "
            f"{media.width}x{media.height}), over limits.max_video_bytes "
            f"({human_bytes(limits.max_video_bytes)}); track fewer frames with the sidecar's "
            "max_frame_num_to_track, or raise limits.max_video_bytes in the config.",
            file=str(media.path))


# ---------------------------------------------------------------------------------------
# slides, whole (small ones, or a caller that does not read by region)


@dataclass(frozen=True)
class _SlideSource:
    path: Path
    limits: MediaLimits
    reader: SlideReader | None  # the job's open slide; None: opened for each read (a frame of a folder)

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        if self.reader is not None:
            yield from _whole(self.reader, indices, self.limits)
            return
        with open_slide(self.path, limits=self.limits, channels=ChannelRule()) as reader:
            yield from _whole(reader, indices, self.limits)


def _whole(reader: SlideReader, indices: Sequence[int], limits: MediaLimits) -> Iterator[np.ndarray]:
    _check_whole_slide(reader, limits)
    for _ in indices:
        yield reader.read_raw(0, 0, reader.width, reader.height)


def _check_whole_slide(reader: SlideReader, limits: MediaLimits) -> None:
    if reader.width * reader.height > limits.max_image_pixels:
        raise JobError(
            "image_too_large",
            f"'{reader.path.name}' is a {reader.width}x{reader.height} slide, over "
            f"limits.max_image_pixels ({limits.max_image_pixels:,}) to decode whole; it is read "
            "by regions: give the job a region or tiling block, or raise the limit.",
            file=str(reader.path))


def _open_slide(path: Path, limits: MediaLimits, rule: ChannelRule | None) -> Opened:
    reader = open_slide(path, limits=limits, channels=rule or ChannelRule())
    axes = "YX" if reader.n_channels == 1 else "YXS"
    opened = Opened(_SlideSource(path, limits, reader if rule is not None else None), reader.width, reader.height,
                    1, reader.n_channels, axes, str(reader.dtype), slide=reader.describe())
    if rule is None:
        reader.close()
    return opened


# ---------------------------------------------------------------------------------------
# name.frames/ folders


@dataclass(frozen=True)
class _FolderSource:
    stills: tuple[Source, ...]

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for index in indices:
            (raw,) = self.stills[index].read([0])
            yield raw


def _open_folder(folder: Path, limits: MediaLimits) -> Opened:
    files = frame_files(folder)
    if not files:
        raise JobError("image_unreadable", f"'{folder.name}' holds no image files; put frames "
                       f"({', '.join(sorted(IMAGE_SUFFIXES))}) in it.", file=str(folder))
    opened = [_open_any(f, limits, None, 0) for f in files]
    first = opened[0]
    for file, other in zip(files[1:], opened[1:]):
        if (other.width, other.height, other.dtype, other.n_channels) != \
                (first.width, first.height, first.dtype, first.n_channels):
            raise JobError(
                "image_unreadable",
                f"Frame '{file.name}' in '{folder.name}' is {other.width}x{other.height} "
                f"{other.dtype} with {other.n_channels} channel(s) but the first frame "
                f"'{files[0].name}' is {first.width}x{first.height} {first.dtype} with "
                f"{first.n_channels}; save all frames alike.",
                file=str(file))
    source = _FolderSource(tuple(o.source for o in opened))
    return Opened(source, first.width, first.height, len(files), first.n_channels,
                   "T" + first.axes, first.dtype)
