"""Media as files, never decoded: which names samwatch reads, and a file's content hash.

The control side (watcher, discovery, input facts) needs only this, so it imports no codec
(PIL, tifffile, PyAV, OpenSlide); the readers in ``media`` and ``slides`` take their suffix
sets from here too, so there is one list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from samwatch.errors import JobError

TIFF_SUFFIXES: frozenset[str] = frozenset({".tif", ".tiff"})
#: The slide formats OpenSlide reads.
OPENSLIDE_SUFFIXES: frozenset[str] = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".czi"})
#: Slide formats samwatch knows it cannot read, with what they are.
FOREIGN_SLIDE_SUFFIXES: dict[str, str] = {
    ".vsi": "Olympus/Evident VSI", ".lif": "Leica LIF", ".nd2": "Nikon ND2", ".ims": "Imaris IMS",
    ".oib": "Olympus OIB", ".oir": "Olympus OIR",
}
#: Every suffix that names a slide (the TIFF suffixes only when the file is tiled; see slides.is_slide).
SLIDE_SUFFIXES: frozenset[str] = OPENSLIDE_SUFFIXES | frozenset(FOREIGN_SLIDE_SUFFIXES)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp"}) | TIFF_SUFFIXES | SLIDE_SUFFIXES
#: TIFFs are listed with the images: a multi-page one is a stack, known only once opened.
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".avi", ".mov", ".gif"})
MEDIA_SUFFIXES: frozenset[str] = IMAGE_SUFFIXES | VIDEO_SUFFIXES
#: A folder named ``<name>.frames`` is one sequence: its images, in natural order.
FRAMES_DIR_SUFFIX = ".frames"

_HASH_CHUNK = 1 << 20


def is_media_path(path: Path) -> bool:
    """Whether samwatch reads ``path``, by suffix (a ``.frames`` name must be a folder).

    Hidden names are never media: macOS writes ``._name.png`` companions that are not images.
    """
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.name.lower().endswith(FRAMES_DIR_SUFFIX):
        return path.is_dir()
    return path.suffix.lower() in MEDIA_SUFFIXES


def not_found(path: Path) -> JobError:
    return JobError("image_not_found", f"'{path.name}' does not exist; check the name, or wait "
                    "until it has been copied in.", file=str(path))


def frame_files(folder: Path) -> list[Path]:
    """A ``.frames`` folder's images, in natural order (frame2 before frame10)."""
    files = (p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(files, key=_natural_key)


def content_hash(path: Path) -> str:
    """sha256 hex of a file's bytes; for a ``.frames`` folder, of its frames' names and bytes."""
    path = Path(path)
    if not path.exists():
        raise not_found(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in frame_files(path):
            # Name and length delimit each file: moving bytes between frames changes the hash.
            digest.update(file.name.encode() + b"\0" + file.stat().st_size.to_bytes(8, "little"))
            for chunk in _chunks(file):
                digest.update(chunk)
    else:
        for chunk in _chunks(path):
            digest.update(chunk)
    return digest.hexdigest()


def _natural_key(path: Path) -> tuple[list[int | str], str]:
    # re.split with a group alternates text and digits, so ints only meet ints.
    parts = re.split(r"(\d+)", path.name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], path.name


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            yield chunk
