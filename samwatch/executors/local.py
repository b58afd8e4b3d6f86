"""The embedded executor: one worker thread per device slot, in this process.

Each slot has its own model pool (models stay loaded between its jobs), so ``device:
[cuda:0, cuda:1]`` runs two jobs at once, one per GPU. With ``threaded=False`` (``run
--once``) a dispatch runs inside ``submit``, on the caller's thread.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from samwatch.executors.base import Dispatch, Event, Finished, ProgressChannel
from samwatch.config import Config
from samwatch.jobs import JobRunner, Progress
from samwatch.models.device import describe
from samwatch.models.pool import ModelPool



@dataclass
class _Slot:
    name: str
    pool: ModelPool
    tickets: queue.Queue[Dispatch | None]
    current: Dispatch | None = None
    thread: threading.Thread | None = None


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
        self._slots = [_Slot(f"local-{index}", pool, queue.Queue()) for index, pool in enumerate(pools)]
        if threaded:
            for slot in self._slots:
                slot.thread = threading.Thread(target=self._serve, args=(slot,), name=f"samwatch-{slot.name}", daemon=True)
                slot.thread.start()

    @property
    def pools(self) -> list[ModelPool]:
        return [slot.pool for slot in self._slots]

    def free_slots(self) -> int:
        return sum(slot.current is None for slot in self._slots)

    def submit(self, dispatch: Dispatch) -> None:
        slot = next(slot for slot in self._slots if slot.current is None)
        slot.current = dispatch
        self._cancels[dispatch.token] = threading.Event()
        if slot.thread is None:
            self._run(slot, dispatch)
        else:
            slot.tickets.put(dispatch)

    def _serve(self, slot: _Slot) -> None:
        while (dispatch := slot.tickets.get()) is not None:
            self._run(slot, dispatch)

    def _run(self, slot: _Slot, dispatch: Dispatch) -> None:
        ticket = dispatch.ticket
        channel = ProgressChannel(ticket.job_id, dispatch.token, self._events.put)
        progress = Progress(channel, self._cancels[dispatch.token], clock=self._clock)
        config = self._config
        outcome = JobRunner(config, self._registry, slot.pool, config.models.prompt_batch_size).run(ticket, progress)
        self._cancels.pop(dispatch.token, None)
        slot.current = None  # free before the message: the daemon may dispatch as soon as it reads it
        self._events.put(Finished(ticket.job_id, dispatch.token, outcome, slot.name))

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
                "job": slot.current.ticket.job_id if slot.current is not None else None,
            }
            for slot in self._slots
        ]

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        self._config = config
        for slot in self._slots:
            slot.pool.evict(changed)
            slot.pool.settings = config.models

    def map_units(self, fn: Callable[[Any], Any], units: Iterable[Any]) -> list[Any]:
        # A slot owns its device: the units of its job run there, one after another.
        return [fn(unit) for unit in units]

    def close(self) -> None:
        for slot in self._slots:
            slot.tickets.put(None)


def _device_memory_mb(device: torch.device, process_rss_mb: int) -> int:
    """GPU memory held by this process on a CUDA device; else the process's resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.memory_reserved(device) / 2**20)
    return process_rss_mb
