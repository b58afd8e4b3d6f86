"""A fake model family: the seam tests use where only the plumbing is under test.

It replaces ``adapter_class`` (the one place samwatch picks a model family), so the daemon,
watcher, ledger, claims and outbox all run for real while a "model" costs microseconds.
A prompt's box becomes its mask. A sidecar label ``slow:N`` makes the job take N seconds,
reporting progress ten times a second (so cancellation and heartbeats can be observed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from samwatch.models.base import Detection, LoadSpec, RunContext


class FakeAdapter:
    def setup(self, spec: LoadSpec, device, *, embedding_cache: int = 4) -> None:  # noqa: ANN001
        self.spec = spec

    def parameter_bytes(self) -> int:
        return 1000

    def run(self, ctx: RunContext) -> Iterator[Detection]:
        """Lazily, one full-frame mask at a time, as a real adapter may: the job runner must
        not hold them all (test_faults measures that)."""
        label = ctx.sidecar.label or ""
        if label.startswith("slow:"):
            seconds = float(label.split(":", 1)[1])
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                ctx.progress("decoding prompts", elapsed / seconds)
                time.sleep(0.1)
        height, width = ctx.image.shape[:2]
        for index, prompt in enumerate(ctx.sidecar.prompts):
            mask = np.full((height, width), False)  # every page written, as a real decoder does
            if prompt.bbox is not None:
                x1, y1, x2, y2 = (int(round(v)) for v in prompt.bbox)
                mask[y1:y2, x1:x2] = True
            yield Detection(mask=mask, score=0.9, prompt_idx=index)
        ctx.progress("decoding prompts", 1.0)


def install() -> None:
    import samwatch.jobs
    import samwatch.models.pool

    def fake_adapter_class(model_type: str) -> type:
        return FakeAdapter

    samwatch.models.pool.adapter_class = fake_adapter_class
    samwatch.jobs.adapter_class = fake_adapter_class
