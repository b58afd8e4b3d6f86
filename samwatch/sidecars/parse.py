"""A sidecar's bytes -> a mapping: JSON fast, YAML otherwise, under the size limit; errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from samwatch.errors import JobError
from samwatch.yaml_child import DuplicateKey, load_yaml

#: libyaml's loader when PyYAML was built with it: ten times faster than the pure-Python one,
#: which would hold the daemon's loop for seconds on a legal 40 000-prompt sidecar, and it
#: limits nesting depth itself.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _as_json_object(text: str | bytes) -> dict[str, Any] | None:
    """The text as a JSON object, or None to read it as YAML. JSON's parser is some forty
    times faster than YAML's on a sidecar of 40 000 prompts, and gives the same mapping."""
    if not text.lstrip()[:1] in (b"{", "{"):
        return None
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs)
    except (ValueError, RecursionError):
        return None  # YAML's flow style, broken, or a key twice: YAML says where
    return data if isinstance(data, dict) else None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a key twice")
    return data


def parse_sidecar_text(text: str | bytes, *, name: str) -> dict[str, Any]:
    """YAML or JSON text -> a mapping (JSON is YAML); ``name`` goes into the error."""
    data = _as_json_object(text)
    try:
        if data is None:
            data = load_yaml(text, _YAML_LOADER)
    except RecursionError:
        raise JobError(
            "sidecar_parse_error",
            "The sidecar is nested too deeply to read (lists or mappings thousands of levels deep); "
            "a sidecar needs a few levels only.",
            file=name,
        ) from None
    except DuplicateKey as exc:
        raise JobError(
            "sidecar_invalid",
            f"The key {exc.key!r} appears twice in one mapping (again at line {exc.line}); "
            "samwatch would have to guess which one you meant: keep one.",
            file=name, field=str(exc.key), line=exc.line,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobError(
            "sidecar_parse_error",
            f"The sidecar is not valid YAML/JSON{where}: {getattr(exc, 'problem', exc)}. Fix the syntax and save it again.",
            file=name,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(
            "sidecar_parse_error",
            f"The sidecar must be a mapping of keys (model:, prompts:, ...), not a {type(data).__name__}"
            + ("; a list of GeoJSON features is a QuPath export: name it NAME.geojson." if isinstance(data, list) else "."),
            file=name,
        )
    return data


def read_sidecar_bytes(path: Path, *, max_bytes: int, name: str) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise JobError(
            "sidecar_too_large",
            f"The sidecar is {size} bytes, more than limits.max_sidecar_bytes ({max_bytes}); "
            "split it into several tagged sidecars or raise the limit.",
            file=name,
        )
    with path.open("rb") as handle:
        return handle.read(max_bytes + 1)
