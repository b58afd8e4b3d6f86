"""Images, stacks and videos on disk -> the RGB uint8 frames the models take, plus metadata.

This module knows nothing of models, sidecars or outputs: it opens a file (or a
``name.frames/`` folder), checks it against :class:`MediaLimits` from its header alone, and
hands out frames lazily as ``H x W x 3`` ``uint8`` arrays.

Readers
-------
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
  NDPI, MRXS, SCN, BIF, ...), see :mod:`samwatch.slides`. They are checked against
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
Frames are converted to RGB uint8 by :mod:`samwatch.pixels` (``ChannelRule``,
``to_rgb8``). For a stack the stretch bounds are computed once, from up to five frames spread
over it, and used for every frame, so brightness stays comparable over time (a frame the
objects have left is not stretched into noise). A still, and :func:`read_image`, use the
one frame's own bounds.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import tifffile
from PIL import Image

from samwatch.errors import JobError
from samwatch.media_files import (
    FRAMES_DIR_SUFFIX,
    IMAGE_SUFFIXES,
    MEDIA_SUFFIXES,
    TIFF_SUFFIXES,
    frame_files,
    not_found,
)
from samwatch.pixels import ChannelRule, check_channels, needs_stretch, select_channels, stretch_bounds, to_rgb8
from samwatch.slides import ArraySource, RegionSource, SlideReader, is_slide, open_slide

_AV_SUFFIXES = frozenset({".mp4", ".avi", ".mov"})
_STRETCH_FRAMES = 5
# Pillow modes whose arrays are usable as they are; every other mode (palette, LA, CMYK,
# YCbCr, ...) is converted to RGB, since Pillow knows what colours those encode.
_PIL_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PIL_NATIVE_MODES = frozenset({"1", "L", "I", "F", "RGB", "RGBA"}) | _PIL_16BIT_MODES
_PIL_DTYPES = {"1": "bool", "I": "int32", "F": "float32"} | dict.fromkeys(_PIL_16BIT_MODES,
                                                                          "uint16")
_PIL_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
_MASK_DIRECT_MODES = frozenset({"1", "L", "P", "I", "F", "RGB"}) | _PIL_16BIT_MODES
# What decoders raise on damaged or foreign bytes (Pillow's UnidentifiedImageError is an
# OSError, PyAV's InvalidDataError a ValueError).
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error,
                  zlib.error, tifffile.TiffFileError, av.FFmpegError,
                  ZeroDivisionError)  # tifffile, on a page 0 pixels high


@dataclass(frozen=True)
class MediaLimits:
    """Guards checked from headers, before any pixel is decoded."""

    max_image_pixels: int = 178_956_970  # decoded at once: a frame, or one region of a slide
    max_video_bytes: int = 4 * 1024**3
    max_slide_pixels: int = 25_000_000_000  # level-0 size of a slide (150 000² fits)


class _Source(Protocol):
    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """Yield the frames at ascending ``indices`` as H x W x C arrays in the file's dtype."""
        ...


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
    _source: _Source = field(repr=False, compare=False)
    _rule: ChannelRule = field(repr=False, compare=False)
    #: For a slide, its reader's ``describe()`` (reader, vendor, levels, mpp, tile size) for provenance.
    slide: dict[str, Any] | None = None

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
    """Open ``path`` from its header, check the limits, and return it ready to read.

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
    (raw,) = media._source.read([0])
    return to_rgb8(raw, channels, channel_axis=-1)


def open_region_source(
    path: Path, *, limits: MediaLimits = MediaLimits(), channels: ChannelRule = ChannelRule()
) -> RegionSource:
    """A still behind the region API: a slide read lazily, any other image decoded once.

    Slides (:func:`samwatch.slides.is_slide`) are checked against ``max_slide_pixels`` and
    decode only the tiles each region touches; an ordinary image is decoded whole under
    ``max_image_pixels`` (its frame 0 for a stack) and served from memory. Close it after use.
    """
    path = Path(path)
    if path.is_file() and is_slide(path):
        return open_slide(path, limits=limits, channels=channels)
    return ArraySource(path, read_image(path, limits=limits, channels=channels), limits)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A mask prompt image as float32 ``shape`` (H, W): 1 where any colour band is nonzero.

    A palette image counts by palette index; alpha is ignored.
    """
    path = Path(path)
    height, width = shape
    if not path.is_file():
        raise JobError("mask_invalid", f"The mask '{path.name}' does not exist; put it next to "
                       "the image or fix its name in the sidecar.", file=str(path))
    try:
        with Image.open(path) as im:
            if im.size != (width, height):
                raise JobError(
                    "mask_invalid",
                    f"The mask '{path.name}' is {im.size[0]}x{im.size[1]} pixels but the image "
                    f"is {width}x{height}; save the mask at the image's size.",
                    file=str(path))
            values = _mask_values(im)
    except (Image.DecompressionBombError, *_DECODE_ERRORS) as exc:
        raise JobError("mask_invalid", f"The mask '{path.name}' could not be read ({exc}); save "
                       "it again as a PNG.", file=str(path)) from exc
    return values.reshape(height, width, -1).any(axis=-1).astype(np.float32)



# ---------------------------------------------------------------------------------------
# opening


@dataclass(frozen=True)
class _Opened:
    source: _Source
    width: int
    height: int
    n_frames: int
    n_channels: int
    axes: str
    dtype: str
    slide: dict[str, Any] | None = None


def _open(
    path: Path, limits: MediaLimits, rule: ChannelRule, frame_axis: str | None, plane_position: int
) -> Media:
    if frame_axis not in (None, "T", "Z"):
        raise ValueError(f"frame_axis must be 'T', 'Z' or None, not {frame_axis!r}")
    opened = _open_any(path, limits, frame_axis, plane_position)
    check_channels(rule.channels, opened.n_channels, path)
    return Media(
        path=path, kind="slide" if opened.slide else "stack" if opened.n_frames > 1 else "image",
        width=opened.width, slide=opened.slide,
        height=opened.height, n_frames=opened.n_frames, axes=opened.axes,
        source_dtype=opened.dtype, _source=opened.source, _rule=rule)


def _open_any(
    path: Path, limits: MediaLimits, frame_axis: str | None, plane_position: int
) -> _Opened:
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
        return _open_slide(path, limits)
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(path, limits, frame_axis, plane_position)
    if suffix in _AV_SUFFIXES:
        return _open_video(path, limits)
    return _open_pil(path, limits, animated=suffix == ".gif")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a decoder's failure into the job error a person can act on."""
    try:
        yield
    except FileNotFoundError as exc:
        raise not_found(path) from exc
    except PermissionError as exc:
        raise JobError("image_unreadable", f"'{path.name}' cannot be read (permission denied); "
                       "make it readable by the user samwatch runs as.", file=str(path)) from exc
    except _DECODE_ERRORS as exc:
        raise JobError("image_unreadable", f"'{path.name}' is truncated, damaged or not the "
                       f"format its name says ({type(exc).__name__}: {exc}); export or copy it "
                       "again.", file=str(path)) from exc


def _check_pixels(path: Path, width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise JobError(
            "image_too_large",
            f"'{path.name}' is {width}x{height} = {width * height:,} pixels per frame, over "
            f"limits.max_image_pixels ({limits.max_image_pixels:,}); downscale or tile it, or "
            "raise the limit in the config if you trust the file.",
            file=str(path))


def _check_sequence(media: Media, held: int, limits: MediaLimits) -> None:
    need = held * media.width * media.height * 3
    if media.kind == "stack" and need > limits.max_video_bytes:
        raise JobError(
            "video_too_large",
            f"'{media.path.name}' needs {_human_bytes(need)} as RGB frames ({held} frames of "
            f"{media.width}x{media.height}), over limits.max_video_bytes "
            f"({_human_bytes(limits.max_video_bytes)}); track fewer frames with the sidecar's "
            "max_frame_num_to_track, or raise limits.max_video_bytes in the config.",
            file=str(media.path))


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------------------------------
# Pillow: PNG, JPEG, BMP, GIF


@contextmanager
def _pil_open(path: Path) -> Iterator[Image.Image]:
    # Pillow's own guard fires inside Image.open, before ours can look at the size.
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise JobError("image_too_large", f"'{path.name}' has more pixels than Pillow's "
                       f"decompression-bomb guard allows ({exc}); downscale or tile it.",
                       file=str(path)) from exc
    with im:
        yield im


def _pil_array(im: Image.Image) -> np.ndarray:
    if im.mode not in _PIL_NATIVE_MODES:
        im = im.convert("RGB")
    array = np.asarray(im)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array.reshape(array.shape[0], array.shape[1], -1)


def _pil_channels(mode: str) -> int:
    if mode == "RGBA":
        return 4
    if mode in _PIL_NATIVE_MODES and mode != "RGB":
        return 1
    return 3  # RGB, or a mode _pil_array converts to RGB


@dataclass(frozen=True)
class _PilSource:
    path: Path

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        with _reading(self.path), _pil_open(self.path) as im:
            for index in indices:
                im.seek(index)
                yield _pil_array(im)


def _open_pil(path: Path, limits: MediaLimits, *, animated: bool) -> _Opened:
    with _reading(path), _pil_open(path) as im:
        width, height = im.size
        _check_pixels(path, width, height, limits)
        n_frames = getattr(im, "n_frames", 1) if animated else 1
        mode = im.mode
    n_channels = _pil_channels(mode)
    axes = ("T" if n_frames > 1 else "") + ("YX" if n_channels == 1 else "YXS")
    return _Opened(_PilSource(path), width, height, n_frames, n_channels, axes,
                   _PIL_DTYPES.get(mode, "uint8"))


def _mask_values(im: Image.Image) -> np.ndarray:
    if im.mode in _PIL_ALPHA_MODES:
        return np.asarray(im)[..., :-1]
    if im.mode in _MASK_DIRECT_MODES:
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------
# tifffile: TIFF, OME-TIFF, ImageJ hyperstacks


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
        with _reading(self.path), tifffile.TiffFile(self.path) as tif:
            for index in indices:
                picked = self.layout.picked(index)
                pages, lead = self.layout.pages(picked)
                yield self.layout.to_hwc(self._read_pages(tif, pages), picked, lead)

    def _read_pages(self, tif: tifffile.TiffFile, pages: list[int]) -> np.ndarray:
        if not self.via_pil:
            return tif.asarray(key=pages, series=0)
        series = tif.series[0]
        with _pil_open(self.path) as im:
            planes = []
            for page in pages:
                im.seek(series.pages[page].index)
                planes.append(np.asarray(im))
        data = np.stack(planes)
        if data.shape[1:] != series.keyframe.shape:
            raise _unsupported_tiff(self.path, f"has pages Pillow decodes as {data.shape[1:]} "
                                    f"instead of {series.keyframe.shape}")
        return data.astype(series.dtype)


def _open_tiff(
    path: Path, limits: MediaLimits, frame_axis: str | None, plane_position: int
) -> _Opened:
    with _reading(path), tifffile.TiffFile(path) as tif:
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
    _check_pixels(path, width, height, limits)
    frame_axes, fixed = _tiff_plan(path, axes, shape, frame_axis, plane_position)
    layout = _TiffLayout(axes, shape, n_lead, frame_axes, fixed)
    return _Opened(_TiffSource(path, layout, via_pil), width, height, layout.n_frames,
                   layout.n_channels, axes, str(dtype))


# ---------------------------------------------------------------------------------------
# slides, whole (small ones, or a caller that does not read by region)


@dataclass(frozen=True)
class _SlideSource:
    path: Path
    limits: MediaLimits

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        with open_slide(self.path, limits=self.limits, channels=ChannelRule()) as reader:
            _check_whole_slide(reader, self.limits)
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


def _open_slide(path: Path, limits: MediaLimits) -> _Opened:
    with open_slide(path, limits=limits, channels=ChannelRule()) as reader:
        axes = "YX" if reader.n_channels == 1 else "YXS"
        return _Opened(_SlideSource(path, limits), reader.width, reader.height, 1, reader.n_channels,
                       axes, str(reader.dtype), slide=reader.describe())


# ---------------------------------------------------------------------------------------
# PyAV: MP4, AVI, MOV


@dataclass(eq=False)
class _VideoSource:
    path: Path
    width: int
    height: int

    # Decoding is sequential: one open decoder is kept and moved forward, so reading the
    # frames of a video in order (as tracking does) costs one pass, not one pass per frame.
    _decoder: Iterator[np.ndarray] | None = field(default=None, init=False, repr=False)
    _position: int = field(default=0, init=False, repr=False)

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for index in indices:
            yield self._frame_at(index)

    def _frame_at(self, index: int) -> np.ndarray:
        if self._decoder is None or index < self._position:
            self._decoder = self._decode_all()
            self._position = 0
        while True:
            try:
                frame = next(self._decoder)
            except StopIteration:
                self._decoder = None
                raise JobError("image_unreadable", f"'{self.path.name}' ends after {self._position} frames, "
                               f"before frame {index} that its header promises; export or copy it "
                               "again.", file=str(self.path)) from None
            self._position += 1
            if self._position - 1 == index:
                return frame

    def _decode_all(self) -> Iterator[np.ndarray]:
        with _reading(self.path), av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                # Scaling to the probed size keeps every frame the same shape even if
                # the stream changes resolution midway.
                yield frame.to_ndarray(format="rgb24", width=self.width, height=self.height)


def _open_video(path: Path, limits: MediaLimits) -> _Opened:
    with _reading(path), av.open(str(path)) as container:
        if not container.streams.video:
            raise JobError("image_unreadable", f"'{path.name}' contains no video stream; "
                           "export the video again.", file=str(path))
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(path, width, height, limits)
        n_frames = stream.frames or sum(1 for _ in container.decode(stream))
    if n_frames == 0:
        raise JobError("image_unreadable", f"'{path.name}' contains no frames; export the "
                       "video again.", file=str(path))
    return _Opened(_VideoSource(path, width, height), width, height, n_frames, 3, "TYXS", "uint8")


# ---------------------------------------------------------------------------------------
# name.frames/ folders


@dataclass(frozen=True)
class _FolderSource:
    stills: tuple[_Source, ...]

    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        for index in indices:
            (raw,) = self.stills[index].read([0])
            yield raw


def _open_folder(folder: Path, limits: MediaLimits) -> _Opened:
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
    return _Opened(source, first.width, first.height, len(files), first.n_channels,
                   "T" + first.axes, first.dtype)
