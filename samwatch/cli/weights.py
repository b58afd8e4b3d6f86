"""``samwatch weights list|add|fetch|remove|cancel``: the weights registry from a shell.

The arguments are ``cli.weights_args``'s, which imports this module only when a weights command
runs (``--config`` is ``args.config``: a Path or None). Each handler takes the parsed args and returns the
exit code: 0 ok, 1 a failure (a download failed), 2 bad usage or a bad config. Without
``--config`` the config is ``./samwatch.config.yaml``: read if it exists (else the built-in defaults),
created by ``add``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from samwatch.config import WeightsEntry
from samwatch.config_file import DEFAULT_CONFIG_PATH, config_path_from, load_config
from samwatch.schema_errors import describe_validation_error
from samwatch.cli.config_edit import add_weights_entry, remove_weights_entry
from samwatch.errors import ConfigError, JobError
from samwatch.weights.entries import download_path, entries_with_defaults
from samwatch.weights.locks import request_cancel
from samwatch.weights.registry import WeightsRegistry

_URL_PREFIXES = ("http://", "https://", "hf://", "file://")
_MB = 1024 * 1024

Handler = Callable[[argparse.Namespace], int]


class _UsageError(Exception):
    """Arguments that cannot be acted on: printed, exit code 2."""


def _handler(run: Handler) -> Handler:
    """Turn the errors a person can fix into messages and exit codes, not tracebacks."""

    @functools.wraps(run)
    def handle(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except _UsageError as exc:
            print(f"samwatch weights: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{exc.file}: {problem}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"samwatch weights: {exc}", file=sys.stderr)
            return 1

    return handle


@_handler
def run_list(args: argparse.Namespace) -> int:
    registry = _open_registry(args)
    try:
        items = [item for item in registry.listing() if args.type in (None, item["type"])]
    finally:
        registry.close()
    print(json.dumps(items, indent=2) if args.json else _table(items))
    return 0


@_handler
def run_add(args: argparse.Namespace) -> int:
    if args.sam2_config and not args.type.startswith("sam2"):
        raise _UsageError("--sam2-config applies to the sam2_* types only")
    entry = _new_entry(args) if args.url is None else _imported_entry(args)
    path = add_weights_entry(_edit_path(args), entry)
    print(f"Registered {entry.type} {entry.name!r} ({entry.source}) in {path}; a running daemon picks it up.")
    if entry.url is not None and args.url is None:
        print(f"Download it now with: samwatch weights fetch {entry.name} --type {entry.type}")
    return 0


@_handler
def run_fetch(args: argparse.Namespace) -> int:
    if args.all == (args.name is not None):
        raise _UsageError("give either a NAME or --all")
    registry = _open_registry(args)
    try:
        if args.all:
            entries = [e for e in registry.entries() if args.type in (None, e.type)]
        else:
            entries = [_one_named(registry.entries(), args.name, args.type)]
        failed = [entry for entry in entries if not _fetch_one(registry, entry)]
    except KeyboardInterrupt:
        print("Interrupted: the download was cancelled.", file=sys.stderr)
        return 1
    finally:
        registry.close()
    return 1 if failed else 0


@_handler
def run_remove(args: argparse.Namespace) -> int:
    path = _edit_path(args)
    if not path.exists():
        raise _UsageError(f"{path} does not exist: there is nothing to remove")
    config = load_config(path, check_files=False)
    named = [e for e in config.weights if e.name == args.name and args.type in (None, e.type)]
    if not named and args.name == "default":
        raise _UsageError(
            "the built-in 'default' entries cannot be removed; `samwatch weights add default TYPE URL` overrides one"
        )
    entry = _one_named(named, args.name, args.type)
    if not remove_weights_entry(path, entry.type, entry.name):
        print(f"{path}: {entry.type} {entry.name!r} vanished before it could be removed", file=sys.stderr)
        return 1
    print(f"Removed {entry.type} {entry.name!r} from {path}; a running daemon picks it up.")
    if entry.url is not None and (file := download_path(config.state_dir / "weights", entry)).is_file():
        print(f"Its downloaded file {file} is kept ({file.stat().st_size / _MB:.1f} MB); delete it to free the space.")
    return 0


@_handler
def run_cancel(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args), check_files=False)
    request_cancel(config.state_dir, args.type, args.name)
    which = " ".join(part for part in (args.type, repr(args.name) if args.name else None) if part)
    print(f"Asked {f'the {which} download' if which else 'every download'} under {config.state_dir} to stop.")
    return 0


# -- helpers ------------------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path | None:
    given = getattr(args, "config", None)
    return config_path_from(Path(given) if given is not None else None)


def _edit_path(args: argparse.Namespace) -> Path:
    given = getattr(args, "config", None)
    return Path(given) if given is not None else DEFAULT_CONFIG_PATH


def _open_registry(args: argparse.Namespace) -> WeightsRegistry:
    # a path entry whose file is gone is shown as missing, not a reason to refuse the whole config
    path = _config_path(args)
    config = load_config(path, check_files=False)
    return WeightsRegistry(config.weights, config.state_dir, config_file=path.absolute() if path else None)


def _new_entry(args: argparse.Namespace) -> WeightsEntry:
    source: dict[str, Any]
    if args.source.startswith(_URL_PREFIXES):
        source = {"url": args.source}
    else:
        path = Path(args.source).expanduser().resolve()
        if not path.is_file():
            raise _UsageError(
                f"{args.source}: no such file (a URL must start with {', '.join(_URL_PREFIXES)})"
            )
        source = {"path": path}
    try:
        return WeightsEntry(name=args.name, type=args.type, sha256=args.sha256, config=args.sam2_config, **source)
    except ValidationError as exc:
        raise _UsageError("; ".join(describe_validation_error(exc))) from None


def _imported_entry(args: argparse.Namespace) -> WeightsEntry:
    """``add NAME TYPE FILE --url URL``: FILE checked and copied in as URL's download."""
    from samwatch.weights.offline import check_architecture, import_as_download, official_type_mismatch

    if args.source.startswith(_URL_PREFIXES):
        raise _UsageError("with --url, give the copied FILE (the URL names where it came from)")
    if (owner := official_type_mismatch(args.type, args.url)) is not None:
        raise _UsageError(f"{args.url} is the official {owner} weights, not {args.type}: "
                          f"samwatch weights add {args.name} {owner} {args.source} --url {args.url}")
    source = Path(args.source).expanduser().resolve()
    if not source.is_file():
        raise _UsageError(f"{args.source}: no such file")
    config = load_config(_config_path(args), check_files=False)
    pinned = args.sha256 or next((e.sha256 for e in entries_with_defaults(config.weights).values()
                                  if e.type == args.type and e.url == args.url and e.sha256), None)
    try:
        entry = WeightsEntry(name=args.name, type=args.type, url=args.url, sha256=pinned, config=args.sam2_config)
    except ValidationError as exc:
        raise _UsageError("; ".join(describe_validation_error(exc))) from None
    try:
        check_architecture(entry.type, source, entry.name)
        target, sha = import_as_download(entry, source, config.state_dir / "weights")
    except JobError as exc:
        raise _UsageError(f"{exc.code}: {exc.message}") from None
    print(f"Copied {source} to {target} (sha256 {sha}) as the download of {args.url}.")
    return entry.model_copy(update={"sha256": sha})


def _one_named(entries: Iterable[WeightsEntry], name: str, model_type: str | None) -> WeightsEntry:
    matches = [e for e in entries if e.name == name and model_type in (None, e.type)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        where = f" for {model_type}" if model_type else ""
        raise _UsageError(f"no weights named {name!r}{where}; see `samwatch weights list`")
    raise _UsageError(f"{name!r} exists for {', '.join(e.type for e in matches)}; choose one with --type")


def _fetch_one(registry: WeightsRegistry, entry: WeightsEntry) -> bool:
    label = f"{entry.type}/{entry.name}"
    line = _ProgressLine(label, sys.stderr)
    try:
        spec = registry.fetch(entry.type, entry.name, line)
    except JobError as exc:
        line.end()
        print(f"{label}: {exc.code}: {exc.message}", file=sys.stderr)
        return False
    line.end()
    print(f"{label}: {spec.checkpoint} (sha256 {spec.sha256})")
    return True


class _ProgressLine:
    """Download progress: one rewritten line on a terminal, a plain line per 10 % otherwise."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self._label = label
        self._stream = stream
        self._tty = stream.isatty()
        self._step = -1
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        text = f"{self._label}: {_amount(done, total)}"
        if self._tty:
            self._stream.write(f"\r{text}")
            self._stream.flush()
            self._drawn = True
            return
        step = 10 * done // total if total else done // (100 * _MB)
        if step > self._step:
            self._step = step
            print(text, file=self._stream, flush=True)

    def end(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def _amount(done: int, total: int | None) -> str:
    if total:
        return f"{100 * done / total:3.0f}% {done / _MB:.1f}/{total / _MB:.1f} MB"
    return f"{done / _MB:.1f} MB"


def _table(items: list[dict[str, Any]]) -> str:
    header = ("TYPE", "NAME", "STATE", "SIZE", "SHA256")
    rows = [header] + [
        (
            item["type"],
            item["name"],
            _state_text(item),
            f"{item['size_bytes'] / _MB:.1f} MB" if item["size_bytes"] is not None else "-",
            (item["sha256"] or "-")[:12],
        )
        for item in items
    ]
    sources = ["SOURCE"] + [item["source"] for item in items]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + source
        for row, source in zip(rows, sources)
    )


def _state_text(item: dict[str, Any]) -> str:
    if item["state"] == "downloading":
        percent = f" {item['percent']:.0f}%" if item.get("bytes_total") else ""
        return f"downloading{percent}" + (" (other process)" if item.get("elsewhere") else "")
    if item["state"] == "failed" and item.get("error"):
        return f"failed: {item['error']['error']}"
    return str(item["state"])
