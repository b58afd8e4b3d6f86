"""A config file found, read and checked: the file side of ``samwatch.config``'s schema.

Which file a command reads, its YAML read within a size limit, validated into a ``Config``
with every problem a person can fix listed (``ConfigError``), and the optional extras its keys
need checked as installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from samwatch.config import Config
from samwatch.errors import ConfigError
from samwatch.schema_errors import describe_validation_error
from samwatch.yaml_child import DuplicateKey, unique_keys

MAX_CONFIG_BYTES = 1024 * 1024
#: Read by every command given no --config, when it exists; ``weights add`` creates it.
DEFAULT_CONFIG_PATH = Path("samwatch.config.yaml")


def read_yaml_mapping(path: Path, max_bytes: int) -> dict[str, Any]:
    """Safe-load a YAML (or JSON) mapping, refusing oversized files before parsing."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"file is {size} bytes, more than the limit of {max_bytes}")
    with path.open("rb") as handle:
        data = yaml.load(handle.read(max_bytes + 1), Loader=unique_keys(yaml.SafeLoader))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping of keys, found {type(data).__name__}")
    return data


def config_path_from(given: Path | None) -> Path | None:
    """--config if given, else ./samwatch.config.yaml if it exists; None: built-in defaults."""
    if given is not None:
        return given
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def outbox_named_by(path: Path | None) -> Path:
    """The outbox a config file names, read from the file alone: for a config with errors elsewhere."""
    if path is None:
        return Config().resolved(Path.cwd()).outbox
    try:
        value = read_yaml_mapping(path, MAX_CONFIG_BYTES).get("outbox", Config.model_fields["outbox"].default)
    except (OSError, ValueError, yaml.YAMLError):
        value = Config.model_fields["outbox"].default
    outbox = Path(value) if isinstance(value, str | Path) else Config.model_fields["outbox"].default
    return outbox if outbox.is_absolute() else (path.resolve().parent / outbox).resolve()


def load_config(path: Path | None, *, check_files: bool = True, missing_ok: bool = False) -> Config:
    """The config from ``path`` (or the defaults), validated; raises ConfigError.

    ``missing_ok``: a ``path`` that does not exist means the built-in defaults (the default
    config path, which ``samwatch weights add`` may create later).
    """
    if path is None or (missing_ok and not path.exists()):
        return Config().resolved(Path.cwd() if path is None else path.absolute().parent)
    try:
        data = read_yaml_mapping(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(str(path), ["the config file does not exist"]) from None
    except DuplicateKey as exc:
        raise ConfigError(str(path), [f"{exc.key}: given twice in one mapping (again at line {exc.line}); keep one"]) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [f"cannot read it as YAML: {exc}"]) from None
    try:
        config = Config.model_validate(data).resolved(path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(str(path), describe_validation_error(exc, Config)) from None
    if check_files and (absent := missing_extras(config)):
        raise ConfigError(str(path), absent)
    if check_files:
        missing = [
            f"weights.{index}.path: no such file {entry.path}"
            for index, entry in enumerate(config.weights)
            if entry.path is not None and not entry.path.is_file()
        ]
        if missing:
            raise ConfigError(str(path), missing)
    return config


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked import, or a module without a spec
        return False


def missing_extras(config: Config) -> list[str]:
    """The config's keys that need an optional extra which is not installed (found, not imported)."""
    needs = []
    if config.executor.kind == "dask":
        needs.append("distributed")
        if config.executor.cluster is not None:
            needs.append("dask_jobqueue")
    absent = [module for module in needs if not _installed(module)]
    if not absent:
        return []
    key = "executor.cluster" if "dask_jobqueue" in absent else "executor.kind"
    return [f"{key}: needs {' and '.join(absent)}, not installed: pip install 'samwatch[dask]' "
            "(in the daemon's environment, e.g. .venv/bin/pip)"]
