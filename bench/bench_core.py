"""Core speed figures, each a ratio against a baseline run in the same process.

    python bench/bench_core.py [--device cpu|cuda] [--model vit_t]

1. one samwatch job (sidecar -> GeoJSON on disk) vs the upstream SamPredictor doing the same
   set_image + predict calls directly                                   target <= 1.15x
2. one sidecar with 100 boxes vs 100 one-box jobs                        target >= 5x faster
3. re-run after only the sidecar changed vs the first run                target <= 0.15x
Random weights (no downloads here); the costs do not depend on the weight values.
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
from samwatch.models.device import pick_device  # noqa: E402
from samwatch.models.pool import ModelPool  # noqa: E402
from samwatch.weights.registry import WeightsRegistry  # noqa: E402
from samwatch.models.sam1 import build_predictor  # noqa: E402
from samwatch.outbox import JobOutputs  # noqa: E402
from samwatch.vocab import JobTicket, Progress  # noqa: E402


def real_image() -> np.ndarray:
    from skimage import data, transform

    image = data.astronaut()  # 512×512 RGB
    return (transform.resize(image, (512, 640), preserve_range=True)).astype(np.uint8)


def boxes(count: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    x1 = rng.integers(0, 560, count)
    y1 = rng.integers(0, 430, count)
    return [[float(a), float(b), float(a + rng.integers(20, 80)), float(b + rng.integers(20, 80))] for a, b in zip(x1, y1)]


def _vertices(geometry: dict) -> int:
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return sum(len(ring) for polygon in polygons for ring in polygon)


class Bench:
    def __init__(self, model: str, device: str, root: Path) -> None:
        self.root = root
        torch.manual_seed(0)
        predictor = build_predictor(model, None)
        checkpoint = root / f"{model}.pt"
        torch.save(predictor.model.state_dict(), checkpoint)
        self.config = Config(
            inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state", device=device,
            weights=[{"name": "default", "type": model, "path": str(checkpoint)}],
        )
        self.model = model
        self.device = pick_device(device)
        self.config.inbox.mkdir(parents=True)
        self.registry = WeightsRegistry(self.config.weights, self.config.state_dir)
        self.pool = ModelPool(self.device, self.config.models, cache_dir=self.config.state_dir / "encoders")
        self.runner = JobRunner(self.config, self.registry, self.pool, None)
        self.image_path = self.config.inbox / "img.png"
        Image.fromarray(real_image()).save(self.image_path)
        self.image_sha = content_hash(self.image_path)
        self.direct = build_predictor(model, None)
        self.direct.model.load_state_dict(torch.load(checkpoint, weights_only=True))
        self.direct.model.to(self.device)

    def job(self, name: str, prompts: list[dict], image_key: str | None = None) -> float:
        sidecar = self.config.inbox / f"{name}.yaml"
        sidecar.write_text(yaml.safe_dump({"model": self.model, "image": "img.png", "prompts": prompts}))
        ticket = JobTicket(name, f"{name}.yaml", "img.png", image_key or self.image_sha, name)
        started = time.perf_counter()
        outputs = JobOutputs(self.config.outbox, name)
        outcome = self.runner.run(ticket, Progress(outputs, threading.Event()))
        elapsed = time.perf_counter() - started
        assert outcome.state == "done", outcome.error
        result = outcome.result
        self.last_timings = result["samwatch"]["timings"]
        self.last_vertices = sum(_vertices(f["geometry"]) for f in result["features"])
        return elapsed

    def direct_run(self, prompts: list[list[float]]) -> float:
        started = time.perf_counter()
        image = np.asarray(Image.open(self.image_path).convert("RGB"))
        self.direct.set_image(image)
        for box in prompts:
            self.direct.predict(box=np.array(box), multimask_output=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--boxes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.model, args.device, Path(tmp))
        ten = boxes(10)
        bench.job("warmup", [{"bbox": b} for b in ten[:1]], image_key="warmup")
        bench.direct_run(ten[:1])

        direct = min(bench.direct_run(ten) for _ in range(3))
        runs = []
        for i in range(3):
            elapsed = bench.job(f"same{i}", [{"bbox": b} for b in ten], image_key=f"fresh{i}")
            runs.append((elapsed, bench.last_timings))
        ours, timings = min(runs, key=lambda run: run[0])
        model_part = timings["read"] + timings["inference"]
        print(f"1. job vs direct predictor, 10 boxes: samwatch {ours:.3f} s, direct {direct:.3f} s, "
              f"ratio {ours / direct:.3f}x (target <= 1.15x); without polygon conversion "
              f"{model_part:.3f} s = {model_part / direct:.3f}x; polygons {timings['geometry']:.3f} s for "
              f"{bench.last_vertices} vertices (random weights give speckled masks)")

        many = boxes(args.boxes, seed=1)
        one_sidecar = bench.job("many", [{"bbox": b} for b in many], image_key="many")
        singles = sum(bench.job(f"one{i}", [{"bbox": b}], image_key=f"single{i}") for i, b in enumerate(many))
        print(f"2. {args.boxes} boxes in one sidecar {one_sidecar:.2f} s vs {args.boxes} one-box jobs {singles:.2f} s: "
              f"{singles / one_sidecar:.1f}x faster (target >= 5x)")

        first = bench.job("rerun", [{"bbox": b} for b in ten[:3]], image_key="rerun")
        second = bench.job("rerun", [{"bbox": b} for b in ten[3:6]], image_key="rerun")
        print(f"3. re-run with a changed sidecar {second:.3f} s vs first run {first:.3f} s: "
              f"ratio {second / first:.3f}x (target <= 0.15x)")
        print(f"device={bench.device} model={args.model} torch_threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
