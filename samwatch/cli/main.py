"""``samwatch``: argv -> a command, and exit codes (0 ok, 1 a job or check failed, 2 usage/config)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from typing import TYPE_CHECKING

from samwatch import __version__
from samwatch.errors import ConfigError
from samwatch.logs import setup_logging

if TYPE_CHECKING:
    from samwatch.config import Config
    from samwatch.models.pool import AdapterTable

# The config (pydantic) is imported by the commands that read one: `samwatch status --outbox`
# needs none, and must answer in well under a second on a busy node.


def _common_options() -> argparse.ArgumentParser:
    """Options every command takes, as an argparse parent."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=None,
        help="the YAML config file (default: ./samwatch.config.yaml if it exists, else built-in defaults)",
    )
    return common


def _load(args: argparse.Namespace) -> Config:
    from samwatch.config_file import config_path_from, load_config

    args.config = config_path_from(args.config)
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from samwatch.config_file import DEFAULT_CONFIG_PATH
    from samwatch.control.daemon import Daemon
    from samwatch.control.ledger import LedgerUnreadable
    from samwatch.models.device import DeviceUnavailable

    optional = args.config is None  # on defaults: ./samwatch.config.yaml is watched, and may come later
    config = _load(args)
    setup_logging(config.log_level)
    watched = (args.config or DEFAULT_CONFIG_PATH).absolute()
    try:
        daemon = Daemon.from_config(config, config_path=watched, config_optional=optional, adapters=args.adapters)
    except DeviceUnavailable as exc:
        print(f"samwatch: {exc}; set device: auto or cpu in the config", file=sys.stderr)
        return 2
    except LedgerUnreadable as exc:
        print(f"samwatch: {exc}", file=sys.stderr)
        return 2
    daemon.install_signal_handlers()
    if args.once:
        return daemon.run_once()
    daemon.run_forever(grace_seconds=args.grace)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from samwatch.cli.check import check_paths, workers_python

    config = _load(args)
    problems, notes = workers_python(config)
    problems += check_paths(config, [Path(p) for p in args.paths], config_file=args.config.absolute() if args.config else None)
    for line in problems:
        print(line)
    for line in notes:
        print(f"note: {line}")
    if not problems:
        print("ok: config and sidecars are valid")
    return 1 if problems else 0


def _status_outbox(args: argparse.Namespace) -> Path:
    """The outbox to read: --outbox, else the config's, even when the config has an error.

    A daemon whose config became invalid keeps running on its old one, and that is exactly when
    its status is wanted: the outbox is then read from the file as far as it can be.
    """
    if args.outbox is not None:
        return args.outbox
    try:
        return _load(args).outbox
    except ConfigError as exc:
        from samwatch.config_file import outbox_named_by

        print(f"samwatch: the config has an error (the daemon keeps its old one): {exc}", file=sys.stderr)
        return outbox_named_by(args.config)


def cmd_status(args: argparse.Namespace) -> int:
    path = _status_outbox(args) / "_samwatch" / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"no status at {path}: samwatch has not run with this outbox")
        return 1
    updated = datetime.fromisoformat(status["updated"])
    age = (datetime.now(timezone.utc) - updated).total_seconds()
    stopped = status["state"] == "stopped"  # a clean stop is not a hang
    stale = not stopped and age > 3 * float(status.get("heartbeat_seconds", 5)) + 5
    if args.json:
        print(json.dumps({**status, "age_seconds": round(age, 1), "stale": stale}, indent=2))
        return 1 if stale or stopped else 0
    from samwatch.cli.status_view import print_status

    print_status(status, age, stale, _other_instances(path.parent / "instances", status.get("instance")))
    return 1 if stale or stopped else 0


def _other_instances(folder: Path, own: str | None) -> list[dict]:
    """Other daemons' heartbeats on this outbox (each writes ``_samwatch/instances/<name>.json``)."""
    from samwatch.control.dashboard import read_instances

    return read_instances(folder, {"instance": own})[1:]


def cmd_retry(args: argparse.Namespace) -> int:
    from samwatch.control.outbox import STATE_FOLDER
    from samwatch.control.retry_requests import RetryRequest, request_retry

    if not args.paths and not args.failed:
        print("samwatch retry: name the sidecars, images or folders to run again, or give --failed", file=sys.stderr)
        return 2
    inbox = None
    if args.outbox is not None:
        outbox = args.outbox
    else:
        config = _load(args)
        outbox, inbox = config.outbox, config.inbox
    try:
        paths = tuple(_inbox_relative(inbox, Path(p)) for p in args.paths)
    except ValueError as exc:
        print(f"samwatch retry: {exc}", file=sys.stderr)
        return 2
    request_retry(outbox / STATE_FOLDER, RetryRequest(paths, args.failed))
    what = ", ".join([*paths, *(["every failed job"] if args.failed else [])])
    print(f"Asked the daemon to run again: {what}. It takes the request on its next pass (see samwatch status).")
    return 0


def _inbox_relative(inbox: Path | None, path: Path) -> str:
    """An inbox-relative path from one given on the command line (relative to here, or to the inbox)."""
    if inbox is None or not (path.is_absolute() or path.exists()):
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{path}: give a path inside the inbox (with --outbox: relative to the inbox)")
        return path.as_posix()
    try:
        return path.resolve().relative_to(inbox.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the inbox {inbox}") from None


def cmd_schema(args: argparse.Namespace) -> int:
    from samwatch.config import Config
    from samwatch.sidecars.samapi import sidecar_json_schema

    schema = sidecar_json_schema() if args.which == "sidecar" else Config.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from samwatch.cli.weights_args import add_arguments as add_weights_arguments

    parser = argparse.ArgumentParser(prog="samwatch", description="Segment Anything for watched folders.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_options()

    run = commands.add_parser("run", parents=[common], help="the daemon, in the foreground")
    run.add_argument("--once", action="store_true", help="process what is ready now, then exit")
    run.add_argument("--grace", type=float, default=60.0, help="seconds a running job may finish on SIGTERM")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", parents=[common], help="validate the config and sidecars")
    check.add_argument("paths", nargs="*", help="sidecars (default: every sidecar in the inbox)")
    check.set_defaults(func=cmd_check)

    status = commands.add_parser("status", parents=[common], help="what the daemon is doing (from the outbox heartbeat)")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--outbox", type=Path, default=None, help="read this outbox's heartbeat (no config needed: e.g. the share)"
    )
    status.set_defaults(func=cmd_status)

    retry = commands.add_parser("retry", parents=[common], help="run failed (or any) jobs again")
    retry.add_argument("paths", nargs="*", help="sidecars, images or folders in the inbox whose jobs run again")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--outbox", type=Path, default=None, help="ask through this outbox (no config needed)")
    retry.set_defaults(func=cmd_retry)

    schema = commands.add_parser("schema", help="print the JSON Schema of the sidecar or the config")
    schema.add_argument("which", choices=["sidecar", "config"])
    schema.set_defaults(func=cmd_schema)

    add_weights_arguments(commands, [common])
    return parser


def main(argv: list[str] | None = None, *, adapters: AdapterTable | None = None) -> int:
    """``adapters``: the families table ``run`` hands its model pools (None: samwatch's own;
    tests hand theirs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.adapters = adapters
    setup_logging()  # the daemon's format for every command; `run` then applies the config's level
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"samwatch: invalid config {exc.file}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `samwatch status | head`: the reader has gone, which is not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
