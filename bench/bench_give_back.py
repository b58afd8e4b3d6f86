"""What handing memory back costs a burst of small jobs, against doing it after every job.

    python bench/bench_give_back.py [--jobs 20] [--repeats 3]

A burst of one-box jobs on one image through the job pipeline (the image's embedding cached
after the first job, as when a person re-prompts the same image), with the model libraries of a
daemon serving every family imported. samwatch gives memory back (a full garbage collection,
then malloc_trim) only after a job that grew the process by ``memory.GIVE_BACK_MIN_BYTES``; the
baseline, samwatch before that rule, gave it back after every job. A full collection walks every
object the process holds, so its cost grows with the libraries loaded, not with the job.
Random vit_t weights, eager (no export needed); the cost measured does not depend on them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samwatch import memory  # noqa: E402
from samwatch.config import Config  # noqa: E402
from samwatch.control.outbox import JobOutputs  # noqa: E402
from samwatch.job.pipeline import JobPipeline  # noqa: E402
from samwatch.job.runner import JobRunner  # noqa: E402
from samwatch.models.pool import ModelPool  # noqa: E402
from samwatch.models.sam1 import build_predictor  # noqa: E402
from samwatch.vocab import JobTicket, Progress  # noqa: E402
from samwatch.weights.registry import WeightsRegistry  # noqa: E402


def burst_runner(root: Path, jobs: int) -> JobRunner:
    from skimage import data

    torch.manual_seed(0)
    checkpoint = root / "vit_t.pt"
    torch.save(build_predictor("vit_t", None).model.state_dict(), checkpoint)
    inbox = root / "inbox"
    inbox.mkdir()
    Image.fromarray(data.coins()).save(inbox / "coins.png")
    for index in range(jobs):
        sidecar = {"model": "vit_t", "image": "coins.png", "prompts": [{"bbox": [40 + index, 40, 120, 110]}]}
        (inbox / f"j{index}.yaml").write_text(yaml.safe_dump(sidecar))
    config = Config(inbox=inbox, outbox=root / "outbox", state_dir=root / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": str(checkpoint)}],
                    models={"accelerate": {"cpu": []}})
    return JobRunner(config, WeightsRegistry(config.weights, config.state_dir),
                     ModelPool(torch.device("cpu"), config.models))


def burst(runner: JobRunner, jobs: int, *, after_every_job: bool) -> float:
    rule = memory.PeakMeter.worth_giving_back
    if after_every_job:
        memory.PeakMeter.worth_giving_back = lambda self, started_at: True
    states: list[str] = []
    pipeline = JobPipeline()
    started = time.perf_counter()
    try:
        for index in range(jobs):
            name = f"j{index}"
            pipeline.submit(runner, JobTicket(name, f"{name}.yaml", "coins.png", "one image", "v1"),
                            Progress(JobOutputs(runner.config.outbox, name), threading.Event()),
                            lambda ticket, outcome: states.append(outcome.state))
        pipeline.close()
    finally:
        memory.PeakMeter.worth_giving_back = rule
    assert states == ["done"] * jobs, states
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import sam2.build_sam  # noqa: F401  the libraries of a daemon serving SAM, SAM2 and MobileSAM
    import segment_anything  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        runner = burst_runner(Path(tmp), args.jobs)
        burst(runner, args.jobs, after_every_job=False)  # the model loaded, the embedding cached
        every, grown = [], []
        for _ in range(args.repeats):  # interleaved: load on a shared machine hits both alike
            every.append(burst(runner, args.jobs, after_every_job=True))
            grown.append(burst(runner, args.jobs, after_every_job=False))
    before, after = min(every), min(grown)
    print(f"{args.jobs} one-box jobs on a cached embedding: given back after each job {before:.2f} s "
          f"({before / args.jobs * 1e3:.0f} ms a job), after those that grew the process "
          f"{after:.2f} s ({after / args.jobs * 1e3:.0f} ms a job): {before / after:.2f}x faster")


if __name__ == "__main__":
    main()
