"""``samwatch weights``'s sub-commands and their arguments.

Their handlers (``cli.weights``) load the config and the weights registry; they are imported
only when a weights command runs, so that building the parser for ``samwatch status`` stays light.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from samwatch.families import MODEL_TYPES

Handler = Callable[[argparse.Namespace], int]


def add_arguments(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``weights`` and its sub-commands; each sets ``func`` to its handler.

    ``parents`` carry the options every samwatch command takes (``--config``)."""
    parser = subparsers.add_parser(
        "weights",
        help="list, add, fetch or remove registered weights",
        description="The weights registry: every model type has a built-in 'default'; the config adds more.",
    )
    commands = parser.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", parents=parents, help="every entry and whether its file is on disk")
    listing.add_argument("--type", choices=MODEL_TYPES, help="only this model type")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_run("run_list"))

    add = commands.add_parser("add", parents=parents, help="register weights in the config (a running daemon picks them up)")
    add.add_argument("name", help="the name sidecars use in 'weights:'")
    add.add_argument("type", choices=MODEL_TYPES, help="the model type the weights were trained for")
    add.add_argument(
        "source", metavar="URL_OR_PATH", help="http(s)://, hf://owner/repo/file[@rev], file:// or a local file"
    )
    add.add_argument("--sha256", help="the file's expected sha256; a mismatch is an error, never a silent load")
    add.add_argument(
        "--url", help="offline: FILE is a copy of the weights at this URL (e.g. the type's official URL); it is "
        "kept in state_dir as that URL's download, so the type's default weights and a checkpoint_url of that URL use it",
    )
    add.add_argument("--sam2-config", help="SAM2 only: the Hydra config, e.g. configs/sam2.1/sam2.1_hiera_t.yaml")
    add.set_defaults(func=_run("run_add"))

    fetch = commands.add_parser("fetch", parents=parents, help="download (or verify) weights now")
    fetch.add_argument("name", nargs="?")
    fetch.add_argument("--type", choices=MODEL_TYPES, help="needed when the name exists for several types")
    fetch.add_argument("--all", action="store_true", help="every entry (of --type, if given)")
    fetch.set_defaults(func=_run("run_fetch"))

    remove = commands.add_parser("remove", parents=parents, help="remove an entry from the config (its downloaded file is kept)")
    remove.add_argument("name")
    remove.add_argument("--type", choices=MODEL_TYPES, help="needed when the name exists for several types")
    remove.set_defaults(func=_run("run_remove"))

    cancel = commands.add_parser("cancel", parents=parents, help="stop the downloads under way (in a daemon or a fetch)")
    cancel.add_argument("name", nargs="?", help="only downloads of this name")
    cancel.add_argument("--type", choices=MODEL_TYPES, help="only downloads of this type")
    cancel.set_defaults(func=_run("run_cancel"))


def _run(name: str) -> Handler:
    """The handler ``cli.weights.<name>``, imported when it runs."""

    def handle(args: argparse.Namespace) -> int:
        from samwatch.cli import weights

        return getattr(weights, name)(args)

    return handle
