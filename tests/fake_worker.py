"""A Dask worker preload (``distributed.worker.preload``): the fake model family (fakes.py) in a
worker process the daemon's own cluster started, e.g. a Slurm job of tests/test_slurm.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakes  # noqa: E402

fakes.install()
