"""A Dask worker preload (``distributed.worker.preload: [fake_worker]``, tests/ on PYTHONPATH):
the fake model family (fakes.py) in a worker the daemon's own cluster started, e.g. a Slurm job
of tests/test_slurm.py."""

from fakes import dask_setup  # noqa: F401 - distributed calls a preload's dask_setup(worker)
