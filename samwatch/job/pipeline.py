"""Jobs overlapped across three stages, so the device never waits for the CPU in a burst.

While the device runs job N (encoder, prompt decoding), job N+1's sidecar and image are read
and converted, and job N−1's masks are traced to polygons and written. Each stage is one
thread; queues of one job between stages keep at most one job ahead of each stage. Within a
job, detections go from the device stage to the writing stage through a bounded queue, so
tracing overlaps decoding and a job still holds only a few masks at a time. Reading, tracing
(cv2) and the runtimes release the GIL for their heavy parts, which is what lets the stages
run at once. Every failure becomes that job's outcome (jobs.py ``outcome_of_error``); a job
refused while reading reports at once, the others in submission order.

Each job brings its own ``JobRunner``, so a job runs entirely under the config it was
submitted with, even when the config is reloaded while it is in flight. A job read ahead
while the device is busy says so (stage ``waiting for the device``): the stall watchdog
does not count that wait against it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from samwatch.job.runner import JobRunner, Prepared, outcome_of_error
from samwatch.memory import PeakMeter, give_back
from samwatch.models.base import Detection
from samwatch.vocab import WAITING_FOR_DEVICE, JobTicket, Outcome, Progress

Done = Callable[[JobTicket, Outcome], None]
#: Detections in flight between the device and the writer, per job.
HANDOFF = 16


@dataclass
class _Job:
    runner: JobRunner
    ticket: JobTicket
    progress: Progress
    done: Done
    started: float
    prepared: Prepared | None = None
    detections: queue.Queue | None = None
    #: the process's RSS when the job reached the device (memory.PeakMeter.start)
    rss_at_start: int = 0


class _End:
    """Closes a job's detection stream; ``error`` is what stopped the device stage, if anything."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


class JobPipeline:
    def __init__(self, *, name: str = "pipeline") -> None:
        self._lock = threading.Lock()
        self._for_device = 0  # jobs read and not yet through the device stage
        #: time the device stage has spent on jobs: over wall time, how busy the device was kept
        self.device_seconds = 0.0
        #: the process's peak RSS while the last job was on the device (memory.PeakMeter)
        self.last_job_peak: int | None = None
        self._meter = PeakMeter()
        self._to_read: queue.Queue[_Job | None] = queue.Queue()
        self._to_device: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._to_write: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._threads = [
            threading.Thread(target=stage, name=f"samwatch-{name}-{stage_name}", daemon=True)
            for stage_name, stage in (("read", self._read), ("device", self._device), ("write", self._write))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, runner: JobRunner, ticket: JobTicket, progress: Progress, done: Done) -> None:
        """Queue a job; ``done(ticket, outcome)`` is called from a stage thread when it ends."""
        self._to_read.put(_Job(runner, ticket, progress, done, time.perf_counter()))

    def stop(self) -> None:
        """No more jobs: the stage threads end once the jobs submitted are through."""
        self._to_read.put(None)

    def close(self) -> None:
        """Finish the jobs submitted, then stop the stage threads."""
        self.stop()
        for thread in self._threads:
            thread.join()

    def _end(self, job: _Job, outcome: Outcome) -> None:
        outcome.seconds = time.perf_counter() - job.started
        job.done(job.ticket, outcome)

    def _read(self) -> None:
        while (job := self._to_read.get()) is not None:
            try:
                prepared = job.runner.prepare(job.ticket, job.progress)
                if not isinstance(prepared, Outcome) and self._for_device:
                    job.progress(WAITING_FOR_DEVICE, 0.0, "read; the job before it is on the device")
            except Exception as exc:
                self._end(job, outcome_of_error(job.ticket, exc))
                continue
            if isinstance(prepared, Outcome):
                self._end(job, prepared)
                continue
            job.prepared = prepared
            with self._lock:
                self._for_device += 1
            self._to_device.put(job)
        self._to_device.put(None)

    def _device(self) -> None:
        while (job := self._to_device.get()) is not None:
            started = time.perf_counter()
            job.rss_at_start = self._meter.start()
            job.detections = queue.Queue(maxsize=HANDOFF)
            self._to_write.put(job)  # the writer traces while this stage decodes
            try:
                for detection in job.runner.infer(job.prepared):
                    job.detections.put(detection)
            except Exception as exc:
                job.detections.put(_End(exc))
            else:
                job.detections.put(_End())
            finally:
                with self._lock:
                    self._for_device -= 1
                self.device_seconds += time.perf_counter() - started
                self.last_job_peak = self._meter.peak()
        self._to_write.put(None)

    def _write(self) -> None:
        while (job := self._to_write.get()) is not None:
            stream = _Stream(job.detections)
            try:
                outcome = job.runner.finish(job.prepared, stream)
            except Exception as exc:
                stream.drain()  # let the device stage finish this job and go on
                outcome = outcome_of_error(job.ticket, exc)
            self._end(job, outcome)
            job.prepared = job.detections = None  # the other stages' threads still name this job
            del outcome, stream
            if self._meter.worth_giving_back(job.rss_at_start):
                give_back()  # what the job used goes back to the system, not into an idle daemon's RSS


class _Stream:
    """One job's detections as the device stage hands them over."""

    def __init__(self, detections: queue.Queue) -> None:
        self._detections = detections
        self._ended = False

    def __iter__(self) -> Iterator[Detection]:
        while not isinstance(item := self._detections.get(), _End):
            yield item
        self._ended = True
        if item.error is not None:
            raise item.error

    def drain(self) -> None:
        while not self._ended:
            self._ended = isinstance(self._detections.get(), _End)
