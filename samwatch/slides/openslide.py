"""Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, ... through OpenSlide.

OpenSlide detects the vendor from the file's content, not its name; a file it does not
recognise is refused as an unsupported slide format. Its regions are RGBA with transparent
pixels where nothing was scanned: those are composited onto the slide's background colour
(``openslide.background-color``, white when the file does not say), as OpenSlide's viewers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samwatch.errors import JobError
from samwatch.pixels import ChannelRule
from samwatch.slides.base import Level, SlideReader
from samwatch.slides.tiff import check_tiff_complete

if TYPE_CHECKING:
    from samwatch.media import MediaLimits

#: The OpenSlide suffixes (media_files) that are TIFF files, checked for truncation first: OpenSlide only says it cannot
# recognise a cut-short file.
_TIFF_BASED = frozenset({".svs", ".ndpi", ".scn", ".bif", ".svslide"})


def _openslide():  # noqa: ANN202 - the module, imported only when a slide needs it
    try:
        import openslide
    except ImportError as exc:
        raise JobError("slide_format_unsupported", "Reading SVS, NDPI, MRXS and other vendor slides needs "
                       "OpenSlide; install samwatch[slides] (openslide-python and openslide-bin).") from exc
    return openslide


class OpenSlideReader(SlideReader):
    """One OpenSlide handle; every level OpenSlide reports is a level here."""

    kind = "openslide"

    def __init__(self, path: Path, limits: MediaLimits, rule: ChannelRule) -> None:
        super().__init__(limits, rule)
        self.path = Path(path)
        openslide = _openslide()
        if not self.path.exists():
            raise JobError("image_not_found", f"'{self.path.name}' does not exist; check the name, or "
                           "wait until it has been copied in.", file=str(self.path))
        if self.path.suffix.lower() in _TIFF_BASED:
            check_tiff_complete(self.path)
        companion = self.path.with_suffix("")
        if self.path.suffix.lower() == ".mrxs" and not companion.is_dir():
            raise JobError("image_unreadable", f"'{self.path.name}' is a MIRAX slide without its data folder "
                           f"'{companion.name}/' next to it; copy that folder too.", file=str(self.path))
        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except openslide.OpenSlideError as exc:
            raise self._unreadable(exc) from exc
        if vendor is None:
            raise JobError(
                "slide_format_unsupported",
                f"OpenSlide does not recognise '{self.path.name}' as a slide format it reads (Aperio, "
                "Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, Ventana, Zeiss, generic tiled "
                "TIFF); convert it to OME-TIFF (QuPath: File > Export images > OME TIFF, or bfconvert).",
                file=str(self.path))
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:
            raise self._unreadable(exc) from exc
        self._error = openslide.OpenSlideError
        self.vendor = vendor
        self.levels = tuple(Level(w, h, float(ds)) for (w, h), ds in
                            zip(self._slide.level_dimensions, self._slide.level_downsamples))
        self.dtype = np.dtype(np.uint8)
        self.n_channels = 3
        props = self._slide.properties
        self.mpp = _pair(props, openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
        tile = _pair(props, "openslide.level[0].tile-width", "openslide.level[0].tile-height")
        self.tile_size = (int(tile[0]), int(tile[1])) if tile else None
        colour = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        self._background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], np.uint16)
        try:
            self._check_slide_size()
        except JobError:
            self.close()
            raise

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.levels[level].downsample
        try:
            region = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except self._error as exc:
            raise JobError(
                "slide_tile_corrupt",
                f"OpenSlide could not decode level {level} of '{self.path.name}' inside the region "
                f"x={x}, y={y}, {w}x{h} (level pixels): {exc}; the file is damaged: export or copy it "
                "again.", file=str(self.path)) from exc
        rgba = np.asarray(region, dtype=np.uint16)
        alpha = rgba[..., 3:]
        # Not premultiplied (openslide-python undoes that): blend with integer rounding.
        blended = (rgba[..., :3] * alpha + self._background * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)

    def close(self) -> None:
        self._slide.close()

    def _unreadable(self, exc: Exception) -> JobError:
        return JobError("image_unreadable", f"OpenSlide cannot open '{self.path.name}' ({exc}); the file is "
                        "damaged or incomplete: export or copy it again.", file=str(self.path))


def _pair(props: object, key_x: str, key_y: str) -> tuple[float, float] | None:
    try:
        return float(props[key_x]), float(props[key_y])  # type: ignore[index]
    except (KeyError, ValueError):
        return None
