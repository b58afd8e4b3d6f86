"""Adding and removing weights entries in a config file, in place and atomically.

The file goes through ruamel.yaml's round trip, so a person's comments, quoting, key order and
indentation survive an edit; an added entry is one flow-style line ``- {name: ..., type: ...}``.
The result must pass ``load_config`` before it replaces the file (written aside, fsynced,
renamed), so a running daemon never reads a half-written or invalid config.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken
from ruamel.yaml.util import load_yaml_guess_indent

from samwatch.config import WeightsEntry
from samwatch.config_file import MAX_CONFIG_BYTES, load_config
from samwatch.errors import ConfigError
from samwatch.atomic import atomic_write_bytes


def add_weights_entry(config_path: Path, entry: WeightsEntry) -> Path:
    """Append ``entry`` to the config's weights list (creating the file if needed); the file edited."""
    path = _real_path(config_path)
    document = _Document.read(path)
    weights = document.weights()
    if any(_matches(item, entry.type, entry.name) for item in weights):
        raise ConfigError(
            str(path),
            [
                f"weights: {entry.type} {entry.name!r} is already registered; remove it first with "
                f"`samwatch weights remove {entry.name} --type {entry.type}`"
            ],
        )
    _check_path_exists(path, entry, len(weights))
    item = CommentedMap(entry.model_dump(mode="json", exclude_none=True))
    item.fa.set_flow_style()
    if not weights:
        weights.fa.set_block_style()  # "weights: []" becomes a block list
    weights.append(item)
    _keep_gap_after_list(weights)
    document.commit()
    return path


def remove_weights_entry(config_path: Path, model_type: str, name: str) -> bool:
    """Remove the (type, name) entry from the config; False if the config has no such entry."""
    path = _real_path(config_path)
    if not path.exists():
        return False
    document = _Document.read(path)
    weights = document.weights()
    index = next((i for i, item in enumerate(weights) if _matches(item, model_type, name)), None)
    if index is None:
        return False
    del weights[index]
    if not weights:
        weights.fa.set_flow_style()  # an empty block would read as null, which the schema refuses
    document.commit()
    return True


class _Document:
    """One config file as ruamel.yaml's round-trip tree."""

    def __init__(self, path: Path, data: CommentedMap, yaml: YAML) -> None:
        self.path, self.data, self.yaml = path, data, yaml

    @classmethod
    def read(cls, path: Path) -> _Document:
        yaml = YAML()
        yaml.preserve_quotes = True
        yaml.width = 1_000_000  # never fold a long URL
        if not path.exists():
            return cls(path, CommentedMap(), yaml)
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ValueError(f"file is {path.stat().st_size} bytes, more than the limit of {MAX_CONFIG_BYTES}")
            data, indent, block_seq_indent = load_yaml_guess_indent(path.read_text(encoding="utf-8"), yaml=yaml)
        except (OSError, ValueError, YAMLError) as exc:
            raise ConfigError(str(path), [f"cannot read it as YAML: {exc}"]) from None
        if data is None:
            data = CommentedMap()
        if not isinstance(data, CommentedMap):
            raise ConfigError(str(path), [f"expected a mapping of keys, found {type(data).__name__}"])
        if indent is not None:  # keep the file's list layout ("- x" or "  - x")
            yaml.indent(mapping=2, sequence=indent, offset=block_seq_indent or 0)
        return cls(path, data, yaml)

    def weights(self) -> CommentedSeq:
        weights = self.data.get("weights")
        if weights is None:
            weights = self.data["weights"] = CommentedSeq()
        if not isinstance(weights, CommentedSeq):
            raise ConfigError(str(self.path), ["weights: must be a list of entries"])
        return weights

    def commit(self) -> None:
        """Write aside in the same folder, validate, fsync, rename; the old file stays on any failure."""
        buffer = io.StringIO()
        self.yaml.dump(self.data, buffer)
        mode = self.path.stat().st_mode & 0o7777 if self.path.exists() else None
        atomic_write_bytes(self.path, buffer.getvalue().encode("utf-8"), mode=mode, check=self._validate)

    def _validate(self, written: Path) -> None:
        try:
            # relative paths resolve against the folder, which the temporary shares with the config
            load_config(written, check_files=False)
        except ConfigError as exc:
            raise ConfigError(str(self.path), exc.problems) from None


def _keep_gap_after_list(weights: CommentedSeq) -> None:
    """ruamel keeps the blank lines after a list as a comment of its last item: move them past the new one."""
    if len(weights) < 2:
        return
    previous = weights[-2]
    holder = weights.ca.items.get(len(weights) - 2)
    token = holder[0] if holder else None
    if token is None and isinstance(previous, CommentedMap) and previous and not previous.fa.flow_style():
        holder = previous.ca.items.get(list(previous)[-1])
        token = holder[2] if holder and len(holder) > 2 else None
    if token is None or "\n" not in token.value:
        return
    line, _, gap = token.value.partition("\n")
    if not gap:
        return
    token.value = line + "\n"
    weights.ca.items[len(weights) - 1] = [CommentToken("\n" + gap, CommentMark(0), None), None]


def _real_path(config_path: Path) -> Path:
    # edit the file a symlink points at: os.replace would swap the link for a plain file
    return Path(config_path).expanduser().resolve()


def _matches(item: Any, model_type: str, name: str) -> bool:
    return isinstance(item, dict) and item.get("type") == model_type and str(item.get("name")) == name


def _check_path_exists(path: Path, entry: WeightsEntry, index: int) -> None:
    if entry.path is None:
        return
    file = entry.path if entry.path.is_absolute() else path.parent / entry.path
    if not file.is_file():
        raise ConfigError(str(path), [f"weights.{index}.path: no such file {file}"])
