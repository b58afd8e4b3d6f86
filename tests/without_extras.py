"""``samwatch`` (fake model family) as if the optional extras were not installed.

The top-level modules named in ``SAMWATCH_TEST_ABSENT`` (comma-separated) cannot be imported
or found, as in a plain ``./install.sh`` environment; the CLI is otherwise unchanged.
"""

import os
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path


class _Absent(MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent({n for n in os.environ.get("SAMWATCH_TEST_ABSENT", "").split(",") if n}))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakes  # noqa: E402

fakes.fake_default_url()

from samwatch.cli.main import main  # noqa: E402

raise SystemExit(main(adapters=fakes.fake_adapters))
