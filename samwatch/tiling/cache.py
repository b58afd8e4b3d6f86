"""Tile embeddings on disk: a changed sidecar, a second tagged sidecar or a restart skips the encoder.

One file per embedding in ``state_dir/tile-embeddings/``, named by a hash of the namespace (model
type + weights sha256) and the key (image content + channel rule + frame + tile geometry), so a
different model, weights file, image version or tiling never finds another's embedding. The folder
is bounded (``models.tile_embedding_cache_mb``): after each write the least recently used files
(by mtime, which a hit refreshes) go until it fits. Files are written to a temporary and renamed:
a reader never sees half an embedding, and a damaged file is a miss (and removed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from loguru import logger


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


class TileEmbeddingStore:
    """Embeddings (predictor attributes, as ``EmbeddingMemo`` captures them) by key, on disk."""

    def __init__(self, folder: Path, namespace: str, max_bytes: int) -> None:
        self.folder = folder
        self.namespace = namespace
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(f"{self.namespace}\0{key}".encode()).hexdigest()
        return self.folder / f"{digest[:48]}.pt"

    def load(self, key: str, device: torch.device | str) -> dict[str, Any] | None:
        if self.max_bytes <= 0:
            self.misses += 1
            return None
        path = self._path(key)
        try:
            value = torch.load(path, map_location=device, weights_only=True)
            os.utime(path)  # least recently *used*
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as exc:  # a damaged or foreign file is a miss, not a failed job
            logger.warning(f"tile embedding cache: dropping unreadable {path.name} ({type(exc).__name__})")
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def save(self, key: str, embedding: dict[str, Any]) -> None:
        if self.max_bytes <= 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._path(key)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(_to_cpu(embedding), stream)
            os.replace(temporary, target)
        except OSError as exc:  # a full disk costs the cache, never the job
            Path(temporary).unlink(missing_ok=True)
            logger.warning(f"tile embedding cache: cannot write {target.name}: {exc}")
            return
        self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.folder.glob("*.pt"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def weights_identity(spec: Any) -> str:
    """The weights' sha256, or for an unchecked local file its path, size and mtime."""
    if spec.sha256:
        return spec.sha256
    stat = Path(spec.checkpoint).stat()
    return f"{spec.checkpoint}:{stat.st_size}:{stat.st_mtime_ns}"
