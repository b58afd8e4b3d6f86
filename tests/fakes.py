"""A fake model family: the seam tests use where only the plumbing is under test.

``fake_adapters`` is a families table (``models.pool.AdapterTable``): hand it to a
``ModelPool``, ``Daemon.from_config(adapters=...)`` or ``cli.main(adapters=...)`` (daemons in
subprocesses: fake_samwatch.py), or to Dask workers (``worker_plugin``, fake_worker.py), and
the daemon, watcher, ledger, claims and outbox all run for real while a "model" costs microseconds.
A prompt's box becomes its mask. A sidecar label ``slow:N`` makes the job (each tile of a tiled
one) take N seconds, reporting progress ten times a second (so cancellation and heartbeats can be
observed); ``painted slow:N`` does both.
With the label ``painted``, automask and text jobs find the image's painted objects: one
mask per distinct non-black colour in the pixels they are given (a tile sees the parts of the
objects inside it), so stitching can be checked against known objects; a box prompt then finds
the painted object that fills most of its box (what SAM does with a box around an object).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from samwatch.models.base import Detection, ModelAdapter, RunContext
from samwatch.vocab import LoadSpec


class FakeAdapter(ModelAdapter):
    def setup(self, spec: LoadSpec, device, *, embedding_cache: int = 4) -> None:  # noqa: ANN001
        self.spec = spec

    def parameter_bytes(self) -> int:
        return 1000

    def run(self, ctx: RunContext) -> Iterator[Detection]:
        """Lazily, one full-frame mask at a time, as a real adapter may: the job runner must
        not hold them all (test_faults measures that)."""
        label = ctx.sidecar.label or ""
        words = label.split()  # e.g. "painted slow:0.2": each tile of a painted job takes 0.2 s
        painted = "painted" in words
        slow = next((word for word in words if word.startswith("slow:")), None)
        if slow is not None:
            seconds = float(slow.split(":", 1)[1])
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                ctx.progress("decoding prompts", elapsed / seconds)
                time.sleep(0.1)
        if painted and ctx.sidecar.mode in ("automask", "text"):
            ctx.progress("encoding image", 0.0)
            yield from painted_objects(ctx.image)
            return
        height, width = ctx.image.shape[:2]
        for index, prompt in enumerate(ctx.sidecar.prompts):
            mask = np.full((height, width), False)  # every page written, as a real decoder does
            if painted and prompt.bbox is not None:
                mask = painted_in_box(ctx.image, prompt.bbox)
            elif prompt.bbox is not None:
                x1, y1, x2, y2 = (int(round(v)) for v in prompt.bbox)
                mask[y1:y2, x1:x2] = True
            yield Detection(mask=mask, score=0.9, prompt_idx=index, label=prompt.label, color=prompt.color)
        ctx.progress("decoding prompts", 1.0)


def painted_objects(image: np.ndarray) -> list[Detection]:
    """One detection per distinct non-black colour of ``image``."""
    codes = image[..., 0].astype(np.int64) << 16 | image[..., 1].astype(np.int64) << 8 | image[..., 2]
    return [Detection(mask=codes == code, score=0.9) for code in np.unique(codes) if code != 0]


def painted_in_box(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """All pixels of the non-black colour most frequent within ``box``."""
    codes = image[..., 0].astype(np.int64) << 16 | image[..., 1].astype(np.int64) << 8 | image[..., 2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    values, counts = np.unique(codes[max(y1, 0):y2, max(x1, 0):x2], return_counts=True)
    counts[values == 0] = 0
    if not counts.size or counts.max() == 0:
        return np.zeros(codes.shape, bool)
    return codes == values[counts.argmax()]


def worker_plugin():  # noqa: ANN201
    """A Dask worker plugin: the fake model family handed to every worker's model pool (pickled by value)."""
    from distributed import WorkerPlugin

    class FakeModels(WorkerPlugin):
        name = "samwatch-fake-model"

        def setup(self, worker) -> None:  # noqa: ANN001
            dask_setup(worker)

        def teardown(self, worker) -> None:  # noqa: ANN001
            # the pool built with the fakes goes with them: the next job builds one of the real families
            del worker.samwatch_adapters
            worker.__dict__.pop("_samwatch_pool", None)

    return FakeModels()


def fake_adapters(model_type: str) -> type[ModelAdapter]:
    """The fake families table: every model type is served by ``FakeAdapter``."""
    return FakeAdapter


def dask_setup(worker) -> None:  # noqa: ANN001
    """A Dask worker's model pool gets the fake families table (``executors/dask.py``); also
    what a worker preload runs (fake_worker.py)."""
    fake_default_url()
    worker.samwatch_adapters = fake_adapters


def fake_default_url() -> None:
    """``SAMWATCH_FAKE_DEFAULT_URL`` replaces vit_t's built-in default URL (a daemon on defaults
    must not download 40 MB in a test)."""
    import os

    import samwatch.weights.entries

    if os.environ.get("SAMWATCH_FAKE_DEFAULT_URL"):
        urls = samwatch.weights.entries.DEFAULT_WEIGHT_URLS
        samwatch.weights.entries.DEFAULT_WEIGHT_URLS = {**urls, "vit_t": os.environ["SAMWATCH_FAKE_DEFAULT_URL"]}


class FakeExecutor:
    """An executor the test drives by hand: it holds dispatches until told how they end."""

    kind = "fake"

    def __init__(self, slots: int = 1) -> None:
        from samwatch.executors.base import Finished, ProgressReport

        self._finished, self._report = Finished, ProgressReport
        self.slots = slots
        self.submitted: list = []  # every Dispatch, in order
        self.in_flight: dict[str, object] = {}  # token -> Dispatch
        self.cancelled: list[str] = []
        self.events: list = []

    def free_slots(self) -> int:
        return self.slots - len(self.in_flight)

    def submit(self, dispatch) -> None:  # noqa: ANN001
        self.submitted.append(dispatch)
        self.in_flight[dispatch.token] = dispatch

    def dispatch_of(self, job_id: str):  # noqa: ANN201
        return next(d for d in self.in_flight.values() if d.ticket.job_id == job_id)

    def progress(self, job_id: str, stage: str, percent: float) -> None:
        dispatch = self.dispatch_of(job_id)
        self.events.append(self._report(job_id, dispatch.token, stage, percent, ""))

    def finish(self, job_id: str, outcome, *, token: str | None = None) -> None:  # noqa: ANN001
        """End the run of ``job_id`` (or deliver an outcome for any ``token``, even a stale one)."""
        if token is None:
            token = self.dispatch_of(job_id).token
        self.in_flight.pop(token, None)
        self.events.append(self._finished(job_id, token, outcome, "fake-0"))

    def poll(self, timeout: float = 0.0) -> list:
        events, self.events = self.events, []
        return events

    def cancel(self, token: str) -> None:
        self.cancelled.append(token)

    def workers(self) -> list[dict]:
        return [{"name": "fake-0", "host": "test", "device": "cpu", "memory_mb": 0, "loaded_models": [], "job": None}]

    def reconfigure(self, config, changed) -> None:  # noqa: ANN001
        pass

    def close(self) -> None:
        pass
