"""``samwatch`` with the fake model family installed (see fakes.py); same CLI."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakes  # noqa: E402

fakes.fake_default_url()

from samwatch.cli.main import main  # noqa: E402

raise SystemExit(main(adapters=fakes.fake_adapters))
