"""The weights folder's files: verified-download records, partial downloads, hashing.

``<file>.json`` (url, sha256, size, fetched) is what marks a download as complete and verified;
``<file>.part`` and ``<file>.part.json`` (url, validator, total) are an unfinished one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from samwatch.config import WeightsEntry
from samwatch.atomic import atomic_write_json

CHUNK_BYTES = 1024 * 1024


def verified_sha(entry: WeightsEntry, target: Path) -> str | None:
    """The sha256 recorded for a complete download of exactly this URL (and this sha256, if set)."""
    size = file_size(target)
    record = read_json(sibling(target, ".json"))
    sha = record.get("sha256")
    if size is None or record.get("url") != entry.url or record.get("size") != size or not isinstance(sha, str):
        return None
    if entry.sha256 is not None and sha != entry.sha256:
        return None  # the config now expects other bytes: fetch (and verify) again
    return sha


def part_progress(target: Path) -> tuple[int, int | None]:
    total = read_json(sibling(target, ".part.json")).get("total")
    return file_size(sibling(target, ".part")) or 0, total if isinstance(total, int) else None



def sibling(target: Path, suffix: str) -> Path:
    return target.with_name(target.name + suffix)


def file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_prefix(path: Path, length: int) -> Any:
    """A sha256 already fed with the first ``length`` bytes of ``path`` (a resumed download)."""
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as handle:
            remaining = length
            while remaining and (chunk := handle.read(min(CHUNK_BYTES, remaining))):
                digest.update(chunk)
                remaining -= len(chunk)
    return digest


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, body: dict[str, Any]) -> None:
    atomic_write_json(path, body)  # 0644: other users (the CLI, a second daemon) read records and cancel requests
