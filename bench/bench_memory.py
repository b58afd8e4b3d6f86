"""Peak memory of one job against the number of its prompts, on a large image.

    python bench/bench_memory.py [--side 8192] [--boxes 1000] [--baseline 10] [--model vit_t]

Runs the real job pipeline (JobRunner: image -> model -> features -> GeoJSON) in this process
with random weights (no downloads here). The model is loaded and the image encoded by a warm-up
job first, so what is measured is what a job adds above the loaded model: peak RSS (VmHWM,
reset between jobs) of a ``--baseline``-box job and of a ``--boxes``-box job on the same
``--side``² image. Goal: the big job under 2 GiB above the loaded model, and a ratio near 1
(memory does not grow with prompts; before masks were traced as they came it grew by
~128 MiB per prompt at 8192²).

Random weights give masks that cover the whole image with blobs, whose polygons (millions of
vertices each) would measure the size of the output, not what the pipeline holds. So the
decoder's full-resolution masks, computed for real, are cut to their prompt's box before they
are handed on, as a trained model's masks lie around their box.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samwatch.config import Config  # noqa: E402
from samwatch.jobs import JobRunner  # noqa: E402
from samwatch.media_files import content_hash  # noqa: E402
from samwatch.models.device import default_prompt_batch_size, pick_device  # noqa: E402
from samwatch.models.pool import ModelPool  # noqa: E402
from samwatch.weights.registry import WeightsRegistry  # noqa: E402
from samwatch.models import sam1  # noqa: E402
from samwatch.models.sam1 import build_predictor  # noqa: E402
from samwatch.outbox import JobOutputs  # noqa: E402
from samwatch.vocab import JobTicket, Progress  # noqa: E402

MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def test_image(side: int) -> np.ndarray:
    """Blobs on a gradient: something for the model to outline, cheap to make and compress."""
    yy, xx = np.mgrid[0:side, 0:side]
    grey = ((xx + yy) * (255 / (2 * side))).astype(np.uint8)
    grey[(xx // 97 + yy // 89) % 7 == 0] = 240
    return grey


def boxes(count: int, side: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    size = rng.integers(40, 400, (count, 2))
    x1 = rng.integers(0, side - 400, count)
    y1 = rng.integers(0, side - 400, count)
    return [[float(x), float(y), float(x + w), float(y + h)] for x, y, (w, h) in zip(x1, y1, size)]


def limit_masks_to_their_boxes() -> None:
    decode = sam1.Adapter._decode_batch

    def decode_within_boxes(self, batch, multimask, prompt_masks):  # noqa: ANN001, ANN202
        masks, scores = decode(self, batch, multimask, prompt_masks)
        for (_, prompt), masks_of_prompt in zip(batch, masks):
            x1, y1, x2, y2 = (int(v) for v in prompt.bbox)
            masks_of_prompt[:, :y1] = False  # in place: no second full-frame array
            masks_of_prompt[:, y2:] = False
            masks_of_prompt[:, :, :x1] = False
            masks_of_prompt[:, :, x2:] = False
        return masks, scores

    sam1.Adapter._decode_batch = decode_within_boxes


class Bench:
    def __init__(self, model: str, device: str, side: int, root: Path) -> None:
        torch.manual_seed(0)
        checkpoint = root / f"{model}.pt"
        torch.save(build_predictor(model, None).model.state_dict(), checkpoint)
        self.side = side
        self.config = Config(
            inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state", device=device,
            weights=[{"name": "default", "type": model, "path": str(checkpoint)}],
        )
        self.config.inbox.mkdir(parents=True)
        self.device = pick_device(device)
        self.runner = JobRunner(
            self.config, WeightsRegistry(self.config.weights, self.config.state_dir),
            ModelPool(self.device, self.config.models), default_prompt_batch_size(self.device),
        )
        self.image = self.config.inbox / "big.png"
        Image.fromarray(test_image(side)).save(self.image, compress_level=1)
        self.image_sha = content_hash(self.image)
        self.model = model

    def job(self, name: str, count: int) -> tuple[float, int, int]:
        """(seconds, features, peak RSS above the RSS at its start)."""
        sidecar = self.config.inbox / f"{name}.yaml"
        sidecar.write_text(yaml.safe_dump({
            "model": self.model, "image": self.image.name,
            "prompts": [{"bbox": box} for box in boxes(count, self.side)],
        }))
        outputs = JobOutputs(self.config.outbox, name)
        reset_peak()
        before = _status_kib("VmRSS")
        started = time.perf_counter()
        outcome = self.runner.run(
            JobTicket(name, sidecar.name, self.image.name, self.image_sha, name),
            Progress(outputs, threading.Event()),
        )
        seconds = time.perf_counter() - started
        if outcome.state != "done":
            raise SystemExit(f"job {name} {outcome.state}: {outcome.error and outcome.error.message}")
        return seconds, outcome.features, _status_kib("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    limit_masks_to_their_boxes()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        bench = Bench(args.model, args.device, args.side, Path(tmp))
        bench.job("warm", 1)  # loads the model, encodes and caches the image's embedding
        loaded = _status_kib("VmRSS")
        base_s, base_n, base_peak = bench.job("baseline", args.baseline)
        big_s, big_n, big_peak = bench.job("big", args.boxes)
    print(f"image {args.side}x{args.side}, model {args.model} on {args.device}; "
          f"RSS with the model loaded and the image encoded: {loaded / MiB:.0f} MiB")
    print(f"{args.baseline:5d} boxes: {base_s:7.1f} s, {base_n} features, peak +{base_peak / MiB:.0f} MiB")
    print(f"{args.boxes:5d} boxes: {big_s:7.1f} s, {big_n} features, peak +{big_peak / MiB:.0f} MiB "
          f"(goal < 2048 MiB)")
    print(f"ratio peak({args.boxes}) / peak({args.baseline}): {big_peak / max(base_peak, 1):.2f} "
          f"(prompts x{args.boxes / args.baseline:.0f})")


if __name__ == "__main__":
    main()
