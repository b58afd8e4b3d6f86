"""Which reader opens which slide: OpenSlide by suffix, tifffile for tiled/pyramidal TIFFs.

Vendor formats neither reads (Olympus VSI, Leica LIF, Nikon ND2, Imaris IMS, Olympus
OIB/OIR) are recognised by suffix so that a job on one is refused with advice to convert it,
instead of the file being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from samwatch.errors import JobError
from samwatch.media_files import FOREIGN_SLIDE_SUFFIXES, OPENSLIDE_SUFFIXES, SLIDE_SUFFIXES, TIFF_SUFFIXES
from samwatch.pixels import ChannelRule
from samwatch.slides.base import SlideReader
from samwatch.slides.openslide import OpenSlideReader
from samwatch.slides.tiff import TiffReader, is_tiff_slide

if TYPE_CHECKING:
    from samwatch.media import MediaLimits


def is_slide(path: Path) -> bool:
    """Whether ``path`` is read lazily by region: a vendor slide, or a tiled/pyramidal TIFF.

    A TIFF is only looked at (its header parsed); a foreign vendor format is a slide too, so
    that :func:`open_slide` refuses it with advice.
    """
    suffix = Path(path).suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    return suffix in TIFF_SUFFIXES and is_tiff_slide(Path(path))


def open_slide(path: Path, *, limits: MediaLimits, channels: ChannelRule) -> SlideReader:
    """The lazy reader for a file :func:`is_slide` accepts, checked against max_slide_pixels."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in FOREIGN_SLIDE_SUFFIXES:
        raise JobError(
            "slide_format_unsupported",
            f"'{path.name}' is in {FOREIGN_SLIDE_SUFFIXES[suffix]} format, which samwatch cannot read; "
            "convert it to OME-TIFF (QuPath: File > Export images > OME TIFF, or bfconvert) and drop "
            "that instead.", file=str(path))
    if suffix in OPENSLIDE_SUFFIXES:
        return OpenSlideReader(path, limits, channels)
    return TiffReader(path, limits, channels)
