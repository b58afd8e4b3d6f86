"""The embedded executor: one job pipeline per device slot, in this process.

Each slot has its own model pool (models stay loaded between its jobs), so ``device:
[cuda:0, cuda:1]`` runs jobs on both GPUs at once. A slot holds up to
``executor.pipeline_depth`` jobs (pipeline.py): while one is on the device, the next one's
image is read and the last one's masks are traced, so the device does not wait for the CPU
in a burst. With ``threaded=False`` (tests driving ``Daemon.step``) a dispatch runs whole inside ``submit``,
on the caller's thread.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from samwatch import faults
from samwatch.atomic import encoded_now
from samwatch.executors.base import Dispatch, Event, Finished, ProgressChannel, worker_identity
from samwatch.config import Config
from samwatch.job.runner import JobRunner
from samwatch.memory import MiB, rss_bytes
from samwatch.models.device import describe
from samwatch.models.pool import ModelPool
from samwatch.job.pipeline import JobPipeline
from samwatch.vocab import JobTicket, Outcome, Progress


@dataclass
class _Slot:
    name: str
    pool: ModelPool
    pipeline: JobPipeline | None
    in_flight: dict[str, Dispatch] = field(default_factory=dict)  # token -> dispatch, oldest first
    counts: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0})

    @property
    def identity(self) -> dict[str, str]:
        return worker_identity("local", self.name)


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
        self._depth = config.executor.pipeline_depth if threaded else 1
        self._slots = [
            _Slot(f"local-{index}", pool, JobPipeline(name=f"local-{index}") if threaded else None)
            for index, pool in enumerate(pools)
        ]

    @property
    def pools(self) -> list[ModelPool]:
        return [slot.pool for slot in self._slots]

    def free_slots(self) -> int:
        return sum(max(0, self._depth - len(slot.in_flight)) for slot in self._slots)

    def submit(self, dispatch: Dispatch) -> None:
        # The emptiest slot: a burst spreads over every device before any pipeline fills.
        slot = min((slot for slot in self._slots if len(slot.in_flight) < self._depth), key=lambda s: len(s.in_flight))
        slot.in_flight[dispatch.token] = dispatch
        cancel = self._cancels[dispatch.token] = threading.Event()
        channel = ProgressChannel(dispatch.ticket.job_id, dispatch.token, self._events.put)
        progress = Progress(channel, cancel, clock=self._clock)
        config = self._config  # the job runs under the config of its dispatch, start to end
        identity = slot.identity
        runner = JobRunner(config, self._registry, slot.pool, config.models.prompt_batch_size, identity,
                           sidecar=dispatch.sidecar)

        def done(ticket: JobTicket, outcome: Outcome) -> None:
            outcome.worker = identity
            if outcome.result is not None:  # a large result would hold up the daemon's loop
                outcome.result = encoded_now(outcome.result)
                faults.hit("result encoded", ticket.job_id)
            self._cancels.pop(dispatch.token, None)
            del slot.in_flight[dispatch.token]  # free before the message: the daemon may dispatch as soon as it reads it
            if outcome.state in slot.counts:
                slot.counts[outcome.state] += 1
            self._events.put(Finished(ticket.job_id, dispatch.token, outcome, slot.name))

        if slot.pipeline is None:
            done(dispatch.ticket, runner.run(dispatch.ticket, progress))
        else:
            slot.pipeline.submit(runner, dispatch.ticket, progress, done)

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
        rss_mb = round(rss_bytes() / MiB)
        return [
            {
                "name": slot.name, "host": host, "device": describe(slot.pool.device),
                "memory_mb": _device_memory_mb(slot.pool.device, rss_mb),
                "rss_mb": rss_mb,  # the process's: slots share it
                "last_job_peak_mb": _mib(slot.pipeline.last_job_peak) if slot.pipeline else None,
                "loaded_models": slot.pool.loaded(),
                "job": next((d.ticket.job_id for d in list(slot.in_flight.values())), None),  # the oldest: on the device or done with it
                "jobs": [d.ticket.job_id for d in list(slot.in_flight.values())],
                "device_busy_seconds": round(slot.pipeline.device_seconds, 1) if slot.pipeline else None,
                **slot.counts,
            }
            for slot in self._slots
        ]

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        self._config = config
        for slot in self._slots:
            slot.pool.evict(changed)
            slot.pool.settings = config.models

    def close(self) -> None:
        for slot in self._slots:
            if slot.pipeline is not None:
                slot.pipeline.stop()


def _mib(size: int | None) -> int | None:
    return None if size is None else round(size / MiB)


def _device_memory_mb(device: torch.device, process_rss_mb: int) -> int:
    """GPU memory held by this process on a CUDA device; else the process's resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.memory_reserved(device) / 2**20)
    return process_rss_mb
