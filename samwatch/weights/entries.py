"""Registry entries: the config's, over every type's built-in ``default`` (the families table)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from samwatch.config import WeightsEntry
from samwatch.families import DEFAULT_WEIGHT_URLS, MODEL_TYPES
from samwatch.weights.hf import parse_hf_url

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")

Key = tuple[str, str]


def entries_with_defaults(entries: Iterable[WeightsEntry]) -> dict[Key, WeightsEntry]:
    table = {(t, "default"): WeightsEntry(name="default", type=t, url=DEFAULT_WEIGHT_URLS[t]) for t in MODEL_TYPES}
    table.update({entry_key(entry): entry for entry in entries})
    return table


def entry_key(entry: WeightsEntry) -> Key:
    return (entry.type, entry.name)


def entry_identity(entry: WeightsEntry | None) -> tuple[str, str | None, str | None] | None:
    return None if entry is None else (entry.source, entry.sha256, entry.config)


def as_url(entry: WeightsEntry) -> str:
    return entry.url if entry.url is not None else Path(entry.source).resolve().as_uri()


def download_path(weights_dir: Path, entry: WeightsEntry) -> Path:
    """Where a URL entry's file lives: the URL's file name plus a short hash of the whole URL
    (two URLs ending in ``model.pt`` must not collide), the suffix kept for the loader."""
    assert entry.url is not None
    try:
        ref = parse_hf_url(entry.url)
    except ValueError:
        ref = None
    base = PurePosixPath(ref.filename if ref else urlsplit(entry.url).path).name
    base = _UNSAFE_CHARS.sub("_", base).lstrip(".") or "weights"
    stem, suffix = PurePosixPath(base).stem, PurePosixPath(base).suffix
    digest = hashlib.sha256(entry.url.encode()).hexdigest()[:8]
    return weights_dir / entry.type / f"{stem}-{digest}{suffix}"
