"""The paths a Dask worker sees: ``executor.path_map`` rewrites the prefixes of the daemon's paths
for workers that mount the share elsewhere ({'/srv/samwatch': '/mnt/samwatch'})."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from samwatch.config import Config
from samwatch.vocab import JobTicket, LoadSpec


def as_workers_see_them(config: Config, ticket: JobTicket, spec: LoadSpec) -> tuple[Config, JobTicket, LoadSpec]:
    """A job's config (inbox, state_dir), ticket (an image under inputs.image_roots) and weights,
    at the paths the workers see."""
    path_map = config.executor.path_map
    if not path_map:
        return config, ticket, spec
    config = config.model_copy(update={
        "inbox": map_path(config.inbox, path_map), "state_dir": map_path(config.state_dir, path_map),
    })
    # An image under inputs.image_roots travels as its absolute (real) path; an inbox image is
    # inbox-relative and follows the mapped inbox.
    if ticket.image is not None and Path(ticket.image).is_absolute():
        ticket = replace(ticket, image=str(map_path(Path(ticket.image), path_map)))
    return config, ticket, replace(spec, checkpoint=map_path(Path(spec.checkpoint), path_map))


def map_path(path: Path, path_map: dict[str, str]) -> Path:
    text = str(path)
    for source, target in path_map.items():
        if text == source or text.startswith(source.rstrip("/") + "/"):
            return Path(target.rstrip("/") + text[len(source.rstrip("/")):])
    return path
