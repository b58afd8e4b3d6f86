"""Adding and removing weights entries in a config file, in place and atomically.

The file is edited as text so that a person's comments and layout survive: an added entry
becomes one flow-style line ``  - {name: ..., type: ..., url: ...}`` at the end of the
``weights:`` block, a removed entry loses its lines. Every textual edit is checked by parsing
the result: when it does not mean exactly the intended config (a flow-style list, anchors, an
unusual layout), the file is rewritten from the parsed data instead, with a warning, since
comments are then lost. The result must pass ``load_config`` before it replaces the file
(written aside, fsynced, renamed), so a running daemon never reads a half-written or invalid
config.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from loguru import logger

from samwatch.config import MAX_CONFIG_BYTES, WeightsEntry, load_config, read_yaml_mapping
from samwatch.outbox import fsync_dir
from samwatch.errors import ConfigError

_WEIGHTS_KEY = re.compile(r"^weights\s*:(?P<rest>.*?)\s*$")
_ITEM = re.compile(r"^(?P<indent>\s*)-(\s|$)")
_NEW_FILE_MODE = 0o644


def add_weights_entry(config_path: Path, entry: WeightsEntry) -> Path:
    """Append ``entry`` to the config's weights list (creating the file if needed); the file edited."""
    path = _real_path(config_path)
    text, data = _read(path)
    current = _weights_list(path, data)
    if any(_matches(item, entry.type, entry.name) for item in current):
        raise ConfigError(
            str(path),
            [
                f"weights: {entry.type} {entry.name!r} is already registered; remove it first with "
                f"`samwatch weights remove {entry.name} --type {entry.type}`"
            ],
        )
    _check_path_exists(path, entry, len(current))
    item = entry.model_dump(mode="json", exclude_none=True)
    _commit(path, _append_item(text, _flow(item)), data, [*current, item])
    return path


def remove_weights_entry(config_path: Path, model_type: str, name: str) -> bool:
    """Remove the (type, name) entry from the config; False if the config has no such entry."""
    path = _real_path(config_path)
    if not path.exists():
        return False
    text, data = _read(path)
    current = _weights_list(path, data)
    index = next((i for i, item in enumerate(current) if _matches(item, model_type, name)), None)
    if index is None:
        return False
    _commit(path, _drop_item(text, index, len(current)), data, current[:index] + current[index + 1 :])
    return True


def _real_path(config_path: Path) -> Path:
    # edit the file a symlink points at: os.replace would swap the link for a plain file
    return Path(config_path).expanduser().resolve()


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.exists():
        return "", {}
    try:
        data = read_yaml_mapping(path, MAX_CONFIG_BYTES)
        return path.read_text(encoding="utf-8"), data
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [f"cannot read it as YAML: {exc}"]) from None


def _weights_list(path: Path, data: dict[str, Any]) -> list[Any]:
    weights = data.get("weights") or []
    if not isinstance(weights, list):
        raise ConfigError(str(path), ["weights: must be a list of entries"])
    return weights


def _matches(item: Any, model_type: str, name: str) -> bool:
    return isinstance(item, dict) and item.get("type") == model_type and str(item.get("name")) == name


def _check_path_exists(path: Path, entry: WeightsEntry, index: int) -> None:
    if entry.path is None:
        return
    file = entry.path if entry.path.is_absolute() else path.parent / entry.path
    if not file.is_file():
        raise ConfigError(str(path), [f"weights.{index}.path: no such file {file}"])


def _flow(item: dict[str, Any]) -> str:
    """One entry as a YAML flow mapping; safe_dump quotes whatever YAML would misread."""
    return yaml.safe_dump(item, default_flow_style=True, width=1_000_000, sort_keys=False, allow_unicode=True).strip()


# -- the textual edit: None wherever the layout is not one this understands ---------------


def _weights_block(lines: list[str]) -> tuple[int, int] | None:
    """(index of the top-level ``weights:`` line, index past its block); None without one."""
    key = next((i for i, line in enumerate(lines) if _WEIGHTS_KEY.match(line)), None)
    if key is None:
        return None
    end = key + 1
    # the block runs until the next top-level key; "- " at column 0 is an indentless item
    while end < len(lines) and not _starts_top_level_key(lines[end]):
        end += 1
    return key, end


def _starts_top_level_key(line: str) -> bool:
    return bool(line[:1].strip()) and not line.startswith("#") and not _ITEM.match(line)


def _item_starts(lines: list[str], start: int, end: int) -> list[int]:
    starts = [i for i in range(start, end) if _ITEM.match(lines[i])]
    if not starts:
        return []
    indent = _ITEM.match(lines[starts[0]])["indent"]  # type: ignore[index]
    return [i for i in starts if _ITEM.match(lines[i])["indent"] == indent]  # type: ignore[index]


def _last_content_line(lines: list[str], start: int, end: int) -> int:
    """The last line in [start, end) that is neither blank nor a comment; start - 1 if none."""
    for index in range(end - 1, start - 1, -1):
        stripped = lines[index].strip()
        if stripped and not stripped.startswith("#"):
            return index
    return start - 1


def _append_item(text: str, flow: str) -> str | None:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    block = _weights_block(lines)
    if block is None:
        separator = "\n" if lines else ""
        return "".join(lines) + f"{separator}weights:\n  - {flow}\n"
    key, end = block
    value = _WEIGHTS_KEY.match(lines[key])["rest"].split("#", 1)[0].strip()  # type: ignore[index]
    if value == "[]":
        lines[key] = re.sub(r"\s*\[\]", "", lines[key], count=1)
    elif value:
        return None  # a flow list or a scalar: not edited as text
    starts = _item_starts(lines, key + 1, end)
    indent = _ITEM.match(lines[starts[0]])["indent"] if starts else "  "  # type: ignore[index]
    after = _last_content_line(lines, key + 1, end) if starts else key
    lines.insert(after + 1, f"{indent}- {flow}\n")
    return "".join(lines)


def _drop_item(text: str, index: int, count: int) -> str | None:
    lines = text.splitlines(keepends=True)
    block = _weights_block(lines)
    if block is None:
        return None
    key, end = block
    starts = _item_starts(lines, key + 1, end)
    if len(starts) != count:
        return None
    stop = starts[index + 1] if index + 1 < count else end
    # comments and blank lines after the item belong to what follows: keep them
    last = _last_content_line(lines, starts[index], stop)
    del lines[starts[index] : last + 1]
    if count == 1:  # an empty block would read as null, which the schema refuses
        lines[key] = re.sub(r"^weights\s*:", "weights: []", lines[key], count=1)
    return "".join(lines)


# -- committing ---------------------------------------------------------------------------


def _commit(path: Path, edited: str | None, data: dict[str, Any], weights: list[Any]) -> None:
    intended = {**data, "weights": weights}
    if edited is None or not _means(edited, intended):
        logger.warning(
            "{}: the weights list has a layout samwatch cannot edit in place; rewriting the whole file "
            "(its comments are lost)",
            path,
        )
        edited = yaml.safe_dump(intended, sort_keys=False, allow_unicode=True)
    _replace_validated(path, edited)


def _means(text: str, intended: dict[str, Any]) -> bool:
    try:
        return yaml.safe_load(text) == intended
    except yaml.YAMLError:
        return False


def _replace_validated(path: Path, text: str) -> None:
    """Write aside in the same folder, validate, fsync, rename; the old file stays on any failure."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        try:
            # relative paths resolve against the folder, which the temp file shares with the config
            load_config(tmp, check_files=False)
        except ConfigError as exc:
            raise ConfigError(str(path), exc.problems) from None
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
