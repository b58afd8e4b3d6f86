"""A job's units (tiles) spread over the Dask cluster, from inside the job running on a worker.

A job is itself a task on a worker. :class:`ClusterUnits` (the ``UnitMapper`` its ``JobRunner``
gets there) submits the units through ``distributed.worker_client``: the job's thread secedes
from the worker's thread pool while its units run, so that worker's thread takes units too, and
rejoins once they are through. Results come back in the units' order with at most two per
cluster thread in flight (the job streams them into its stitcher: never all tiles' masks at
once); closing the iterator early (a cancelled job) cancels the units not yet run. Each unit
takes the model from the pool of the worker it lands on (:func:`worker_pool`), one unit at a
time on each worker.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from samwatch.config import Config
from samwatch.executors.base import Place

#: the scheduler's name for the group of tile tasks (apart from the jobs' ``samwatch`` group)
UNIT_PREFIX = "samwatch_unit"
#: fewer units than this run in the job's own thread: sending them out costs more than it gains
MIN_SPREAD_UNITS = 4
#: units in flight per cluster thread: the next one waits on a worker as soon as one ends
IN_FLIGHT_PER_THREAD = 2
_created = threading.Lock()  # a worker's unit lock is made once


def worker_pool(worker: Any, config: Config) -> Any:
    """This worker's model pool, kept between jobs (on the worker object: one per process)."""
    from samwatch.models.device import pick_devices
    from samwatch.models.pool import ModelPool

    pool = getattr(worker, "_samwatch_pool", None)
    if pool is None:
        device = pick_devices(config.executor.device)[0]
        # A worker's families table is samwatch's own unless a preload or plugin gave it one (tests' fakes).
        pool = ModelPool(device, config.models, cache_dir=config.state_dir / "encoders",
                         adapters=getattr(worker, "samwatch_adapters", None))
        worker._samwatch_pool = pool
    return pool


class ClusterUnits:
    """The ``UnitMapper`` of a job running on a Dask worker (executors/base.py)."""

    def __init__(self, config: Config, token: str) -> None:
        self.config, self.token = config, token

    def _threads(self) -> int:
        """Threads that can take units: the cluster's now, or all an adaptive cluster may grow to."""
        from distributed import get_client

        threads = sum(get_client().nthreads().values())
        cluster = self.config.executor.cluster
        return max(threads, cluster.adapt_maximum * cluster.cores) if cluster is not None else threads

    def spreads(self, count: int) -> bool:
        return count >= MIN_SPREAD_UNITS and self._threads() > 1

    def map_units(self, fn: Callable[[Any, Place], Any], units: Iterable[Any]) -> Iterator[Any]:
        from distributed import worker_client

        in_flight = IN_FLIGHT_PER_THREAD * self._threads()
        with worker_client() as client:  # secedes now, rejoins when the units are through or closed
            yield from map_ordered(client, run_unit, ((fn, unit, self.config) for unit in units),
                                   in_flight=in_flight, key=f"{UNIT_PREFIX}-{self.token}")


def map_ordered(client: Any, fn: Callable[[Any], Any], args: Iterable[tuple], *, in_flight: int,
                key: str) -> Iterator[Any]:
    """``fn(*a)`` for each ``a`` as tasks, results in order, at most ``in_flight`` submitted and
    not yet yielded; the ones still pending are cancelled when the iterator is closed."""
    pending: deque[Any] = deque()
    try:
        for index, arguments in enumerate(args):
            pending.append(client.submit(fn, *arguments, key=f"{key}-{index}", pure=False))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def run_unit(fn: Callable[[Any, Place], Any], unit: Any, config: Config) -> Any:
    """One unit on the worker it landed on, with that worker's pool: one unit at a time there (a
    worker of several threads has one pool, whose models hold each image's state)."""
    from distributed import get_worker

    worker = get_worker()
    with _created:
        lock = worker.__dict__.setdefault("_samwatch_unit_lock", threading.Lock())
    with lock:
        return fn(unit, Place(worker_pool(worker, config), str(worker.name)))
