"""Lazy region reads of whole-slide images: only the tiles a region touches are decoded.

The API the tiler codes against (details in ``base``):

* ``RegionSource`` (protocol) / ``SlideReader`` (the readers' shared base): ``width``,
  ``height`` (level 0), ``levels`` (``Level(width, height, downsample)``, ``levels[0]`` full
  resolution), ``kind``, ``read_region(x, y, w, h, level=0)`` -> RGB uint8 (level-0 box,
  zero-filled outside the image), ``read_raw`` (same, stored dtype), ``best_level(ds)``,
  ``level_origin(x, y, level)``, ``check_level``, ``describe()`` (provenance), ``close()``;
  readers are context managers.
* ``is_slide(path)``, ``open_slide(path, limits=, channels=)``: slides only.
* ``samwatch.media.open_region_source(path, limits=, channels=)``: any still, a slide lazily or
  an ordinary image decoded once as an ``ArraySource``. It lives in ``media`` because ordinary
  images are decoded there (and ``media`` routes slides here, so this package never imports it).

Readers: ``tiff`` (tifffile + zarr: tiled/pyramidal TIFF, OME-TIFF), ``openslide`` (SVS, NDPI,
MRXS, SCN, BIF, ...), ``array`` (a decoded image).
"""

from samwatch.slides.array import ArraySource
from samwatch.slides.base import Level, RegionSource, SlideReader
from samwatch.slides.formats import is_slide, open_slide

__all__ = ["ArraySource", "Level", "RegionSource", "SlideReader", "is_slide", "open_slide"]
