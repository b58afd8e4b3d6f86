"""``samwatch check``: the config and sidecars validated without running anything."""

from __future__ import annotations

from pathlib import Path

from samwatch.config import Config
from samwatch.discovery import index_images, is_folder_defaults, is_sidecar, resolve_image, split_name
from samwatch.errors import JobError
from samwatch.jobs import nearest_defaults_file
from samwatch.models.registry import WeightsRegistry
from samwatch.sidecar import merge_folder_defaults, read_sidecar_data, validate_sidecar
from samwatch.watcher import scan_tree


def _relative(config: Config, path: Path) -> str | None:
    try:
        return path.resolve().relative_to(config.inbox.resolve()).as_posix()
    except ValueError:
        return None


def check_sidecar(config: Config, path: Path) -> list[str]:
    """Problems of one sidecar, each ``file: field: message``."""
    rel = _relative(config, path)
    name = rel or str(path)
    max_bytes = config.limits.max_sidecar_bytes
    try:
        data = read_sidecar_data(path, max_bytes=max_bytes, name=name)
        if rel is not None and not is_folder_defaults(rel):
            defaults = nearest_defaults_file(config.inbox, split_name(rel)[0])
            if defaults is not None:
                data = merge_folder_defaults(data, read_sidecar_data(defaults, max_bytes=max_bytes, name=str(defaults)))
        sidecar = validate_sidecar(data, name=name)
        model = sidecar.model or config.defaults.model
        weights = sidecar.weights or config.defaults.weights
        WeightsRegistry(config.weights, config.state_dir).entry(model, weights)
        if rel is not None and not is_folder_defaults(rel):
            folder = split_name(rel)[0]
            listing = [f"{folder}/{p.name}" if folder else p.name for p in path.parent.iterdir()]
            resolve_image(config.inbox, rel, sidecar.image, index_images(listing))
    except FileNotFoundError:
        return [f"{name}: no such file"]
    except JobError as exc:
        return [f"{exc.file or name}: {exc.field or '-'}: {exc.code}: {exc.message}"]
    return []


def check_paths(config: Config, paths: list[Path]) -> list[str]:
    if not paths:
        if not config.inbox.is_dir():
            return []
        paths = [config.inbox / rel for rel in sorted(scan_tree(config.inbox)) if is_sidecar(rel) or is_folder_defaults(rel)]
    problems: list[str] = []
    for path in paths:
        problems.extend(check_sidecar(config, path))
    return problems
