"""The guards a file is checked against from its header, before any pixel is decoded.

Codec-free, so that ``media.slides`` and the config side can take :class:`MediaLimits` from below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samwatch.errors import JobError


@dataclass(frozen=True)
class MediaLimits:
    """Guards checked from headers, before any pixel is decoded."""

    max_image_pixels: int = 178_956_970  # decoded at once: a frame, or one region of a slide
    max_video_bytes: int = 4 * 1024**3
    max_slide_pixels: int = 25_000_000_000  # level-0 size of a slide (150 000² fits)


def check_pixels(path: Path, width: int, height: int, limits: MediaLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise JobError(
            "image_too_large",
            f"'{path.name}' is {width}x{height} = {width * height:,} pixels per frame, over "
            f"limits.max_image_pixels ({limits.max_image_pixels:,}); downscale or tile it, or "
            "raise the limit in the config if you trust the file.",
            file=str(path))


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
