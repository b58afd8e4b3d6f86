"""The embedded executor: one job pipeline per device slot, in this process.

Each slot has its own model pool (models stay loaded between its jobs), so ``device:
[cuda:0, cuda:1]`` runs two jobs at once, one per GPU. A slot takes up to
``models.pipeline_depth`` jobs: while one is on the device the next is read and the one
before traced (samwatch/pipeline.py). With ``threaded=False`` (``run --once``) a dispatch
runs inside ``submit``, on the caller's thread, one at a time.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from samwatch.executors.base import Dispatch, Event, Finished, ProgressChannel
from samwatch.config import Config
from samwatch.jobs import JobRunner, Outcome, Progress
from samwatch.models.device import describe
from samwatch.models.pool import ModelPool
from samwatch.pipeline import JobPipeline



@dataclass
class _Slot:
    name: str
    pool: ModelPool
    running: list[Dispatch] = field(default_factory=list)  # in submission order
    pipeline: JobPipeline | None = None


class LocalExecutor:
    kind = "local"

    def __init__(
        self, config: Config, registry: Any, pools: list[ModelPool], *, threaded: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._registry = registry
        self._clock = clock
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._slots = [_Slot(f"local-{index}", pool) for index, pool in enumerate(pools)]
        self._depth = config.models.pipeline_depth if threaded else 1
        if threaded:
            for slot in self._slots:
                slot.pipeline = JobPipeline(self._runner(slot), name=slot.name)

    @property
    def pools(self) -> list[ModelPool]:
        return [slot.pool for slot in self._slots]

    def free_slots(self) -> int:
        return sum(max(0, self._depth - len(slot.running)) for slot in self._slots)

    def submit(self, dispatch: Dispatch) -> None:
        slot = min(self._slots, key=lambda s: len(s.running))  # the least busy device
        slot.running.append(dispatch)
        self._cancels[dispatch.token] = threading.Event()
        ticket = dispatch.ticket
        channel = ProgressChannel(ticket.job_id, dispatch.token, self._events.put)
        progress = Progress(channel, self._cancels[dispatch.token], clock=self._clock)
        if slot.pipeline is None:
            self._finished(slot, dispatch, self._runner(slot).run(ticket, progress))
        else:
            slot.pipeline.submit(ticket, progress, lambda _ticket, outcome: self._finished(slot, dispatch, outcome))

    def _runner(self, slot: _Slot) -> JobRunner:
        return JobRunner(self._config, self._registry, slot.pool, self._config.models.prompt_batch_size)

    def _finished(self, slot: _Slot, dispatch: Dispatch, outcome: Outcome) -> None:
        self._cancels.pop(dispatch.token, None)
        slot.running.remove(dispatch)  # free before the message: the daemon may dispatch as soon as it reads it
        self._events.put(Finished(dispatch.ticket.job_id, dispatch.token, outcome, slot.name))

    def poll(self, timeout: float = 0.0) -> list[Event]:
        events: list[Event] = []
        try:
            events.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            return events

    def cancel(self, token: str) -> None:
        flag = self._cancels.get(token)
        if flag is not None:
            flag.set()

    def workers(self) -> list[dict[str, Any]]:
        host = socket.gethostname()
        rss_mb = round(psutil.Process(os.getpid()).memory_info().rss / 2**20)
        return [
            {
                "name": slot.name, "host": host, "device": describe(slot.pool.device),
                "memory_mb": _device_memory_mb(slot.pool.device, rss_mb),
                "loaded_models": slot.pool.loaded(),
                "job": slot.running[0].ticket.job_id if slot.running else None,
            }
            for slot in self._slots
        ]

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        self._config = config
        for slot in self._slots:
            slot.pool.evict(changed)
            slot.pool.settings = config.models
            if slot.pipeline is not None:
                slot.pipeline.runner = self._runner(slot)  # jobs from their next phase on

    def map_units(self, fn: Callable[[Any], Any], units: Iterable[Any]) -> list[Any]:
        # A slot owns its device: the units of its job run there, one after another.
        return [fn(unit) for unit in units]

    def close(self) -> None:
        for slot in self._slots:
            if slot.pipeline is not None:
                slot.pipeline.stop()


def _device_memory_mb(device: torch.device, process_rss_mb: int) -> int:
    """GPU memory held by this process on a CUDA device; else the process's resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.memory_reserved(device) / 2**20)
    return process_rss_mb
