"""Weights copied in by hand that keep their official URL (``samwatch weights add ... --url``).

A facility without internet copies ``mobile_sam.pt`` in. Stored where that URL's download would
be, with the same verified record, every entry with that URL finds it as if it had been fetched:
the type's built-in ``default`` (a sidecar naming no weights), a QuPath body's ``checkpoint_url``
and the entry registered by the command.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from samwatch.config import WeightsEntry
from samwatch.errors import JobError
from samwatch.families import DEFAULT_WEIGHT_URLS
from samwatch.weights.entries import download_path
from samwatch.weights.files import CHUNK_BYTES, sibling
from samwatch.weights.http import Transfer


def official_type_mismatch(model_type: str, url: str) -> str | None:
    """The type whose official weights ``url`` is, when that is not ``model_type``."""
    owner = next((t for t, official in DEFAULT_WEIGHT_URLS.items() if official == url), None)
    return owner if owner not in (None, model_type) else None


def check_architecture(model_type: str, path: Path, name: str) -> None:
    """Raise weights_wrong_architecture (or weights_unsafe) unless ``path`` loads as ``model_type``."""
    import torch

    from samwatch.models.base import LoadSpec
    from samwatch.models.pool import adapter_class

    adapter = adapter_class(model_type)()
    adapter.setup(LoadSpec(model_type, path, name, source=str(path)), torch.device("cpu"), embedding_cache=0)


def import_as_download(entry: WeightsEntry, source: Path, weights_dir: Path) -> tuple[Path, str]:
    """Copy ``source`` in as the verified download of ``entry.url``; the file kept and its sha256.

    ``entry.sha256``, when set (given, or pinned for that URL), must match the file's: a copy of
    other bytes is refused, never recorded as the URL's file.
    """
    assert entry.url is not None
    target = download_path(weights_dir, entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(target, ".import")
    digest = hashlib.sha256()
    try:
        with source.open("rb") as reader, staging.open("wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        sha = digest.hexdigest()
        if entry.sha256 is not None and sha != entry.sha256:
            raise JobError(
                "weights_checksum_mismatch",
                f"{source} has sha256 {sha}, but the {entry.type} weights at {entry.url} are pinned to "
                f"{entry.sha256}: it is not that file. Copy the file published at that URL, or register this "
                f"one as weights of your own without --url (samwatch weights add NAME {entry.type} {source}).",
                field="weights", expected=entry.sha256, actual=sha,
            )
        Transfer(entry, target, report=lambda done, total: None, check=lambda: None).install(staging, sha)
    finally:
        staging.unlink(missing_ok=True)
    return target, sha
