"""What every reader hands back: an opened file's metadata and a source of raw frames.

Each format's reader (``media.pil``, ``media.tiff``, ``media.video``, the slide and folder readers in
``media.read``) returns an :class:`Opened`; decoder failures become job errors in :func:`reading`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import av
import numpy as np
import tifffile

from samwatch.errors import JobError
from samwatch.media.files import not_found

# What decoders raise on damaged or foreign bytes (Pillow's UnidentifiedImageError is an
# OSError, PyAV's InvalidDataError a ValueError).
DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error,
                  zlib.error, tifffile.TiffFileError, av.FFmpegError,
                  ZeroDivisionError)  # tifffile, on a page 0 pixels high


class Source(Protocol):
    def read(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """Yield the frames at ascending ``indices`` as H x W x C arrays in the file's dtype."""
        ...


@dataclass(frozen=True)
class Opened:
    source: Source
    width: int
    height: int
    n_frames: int
    n_channels: int
    axes: str
    dtype: str
    slide: dict[str, Any] | None = None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a decoder's failure into the job error a person can act on."""
    try:
        yield
    except FileNotFoundError as exc:
        raise not_found(path) from exc
    except PermissionError as exc:
        raise JobError("image_unreadable", f"'{path.name}' cannot be read (permission denied); "
                       "make it readable by the user samwatch runs as.", file=str(path)) from exc
    except DECODE_ERRORS as exc:
        raise JobError("image_unreadable", f"'{path.name}' is truncated, damaged or not the "
                       f"format its name says ({type(exc).__name__}: {exc}); export or copy it "
                       "again.", file=str(path)) from exc
