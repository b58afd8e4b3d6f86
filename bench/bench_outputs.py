"""What previews and label images cost, as a ratio against the same job without them.

    python bench/bench_outputs.py [--device cpu|cuda] [--model vit_t] [--objects 200] [--size 2048]

One samwatch job (sidecar -> GeoJSON on disk, through JobRunner) on a size² image with
``--objects`` box prompts, run with ``output: {preview: false, formats: [geojson]}`` and with
``output: {preview: true, formats: [geojson, labels]}``, alternately, best of ``--repeat``.
Target: with / without <= 1.15x. Also printed: the extras' own time (preview + label TIFF +
CSV, written in one pass over the same features) against the job's polygon-and-write part.
The model runs for real (image encoder and mask decoder, random weights: no downloads), but
each mask it returns is replaced by the ellipse inscribed in its prompt box (a crop placed by
``Detection.origin``): random weights give masks speckled over the whole image, tens of
thousands of parts each, which would measure a polygon workload no real result has.
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
from samwatch.job.runner import JobRunner  # noqa: E402
from samwatch.media.read import probe  # noqa: E402
from samwatch.media.files import content_hash  # noqa: E402
from samwatch.models.device import default_prompt_batch_size, pick_device  # noqa: E402
from samwatch.models.pool import ModelPool, adapter_class  # noqa: E402
from samwatch.weights.registry import WeightsRegistry  # noqa: E402
from samwatch.models.sam1 import build_predictor  # noqa: E402
from samwatch.control.outbox import JobOutputs  # noqa: E402
from samwatch.outputs.extras import OutputPlan, result_extras  # noqa: E402
from samwatch.sidecars.schema import validate_sidecar  # noqa: E402
from samwatch.vocab import JobTicket, Progress  # noqa: E402

PLAIN = {"preview": False, "formats": ["geojson"]}
EXTRAS = {"preview": True, "formats": ["geojson", "labels"]}


def image(size: int) -> np.ndarray:
    from skimage import data, transform

    return transform.resize(data.astronaut(), (size, size), preserve_range=True).astype(np.uint8)


def boxes(count: int, size: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    corner = rng.integers(0, size - 160, (count, 2))
    extent = rng.integers(30, 150, (count, 2))
    return [[float(x), float(y), float(x + w), float(y + h)] for (x, y), (w, h) in zip(corner, extent)]


def object_masks(model_type: str) -> type:
    """A families table whose adapters' masks become the ellipse in their prompt's box (see the docstring)."""
    base = adapter_class(model_type)

    class Objects(base):  # type: ignore[misc, valid-type]
        def run(self, ctx):  # noqa: ANN001, ANN202 - a generator, as the adapters stream
            for detection in super().run(ctx):
                x1, y1, x2, y2 = (int(v) for v in ctx.sidecar.prompts[detection.prompt_idx].bbox)
                yy, xx = np.ogrid[: y2 - y1, : x2 - x1]
                ry, rx = (y2 - y1) / 2, (x2 - x1) / 2
                detection.mask = ((yy + 0.5 - ry) / ry) ** 2 + ((xx + 0.5 - rx) / rx) ** 2 <= 1
                detection.origin, detection.scale = (x1, y1), 1.0
                yield detection

    return Objects


class KeepingShapes(JobRunner):
    """A runner that keeps its last job's shapes, to time the extras alone on them."""

    def _features(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self.shapes = super()._features(*args, **kwargs)
        return self.shapes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        checkpoint = root / f"{args.model}.pt"
        torch.save(build_predictor(args.model, None).model.state_dict(), checkpoint)
        config = Config(inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state", device=args.device,
                        weights=[{"name": "default", "type": args.model, "path": str(checkpoint)}])
        config.inbox.mkdir(parents=True)
        device = pick_device(args.device)
        registry = WeightsRegistry(config.weights, config.state_dir)
        runner = KeepingShapes(config, registry, ModelPool(device, config.models, adapters=object_masks),
                               default_prompt_batch_size(device))
        Image.fromarray(image(args.size)).save(config.inbox / "img.png")
        sha = content_hash(config.inbox / "img.png")
        prompts = [{"bbox": b} for b in boxes(args.objects, args.size)]

        def job(name: str, output: dict) -> tuple[float, dict]:
            (config.inbox / f"{name}.yaml").write_text(
                yaml.safe_dump({"model": args.model, "image": "img.png", "prompts": prompts, "output": output}))
            ticket = JobTicket(name, f"{name}.yaml", "img.png", sha, name)
            outputs = JobOutputs(config.outbox, name)
            started = time.perf_counter()
            outcome = runner.run(ticket, Progress(outputs, threading.Event()))
            assert outcome.state == "done", outcome.error
            outputs.done(outcome.result, "done", outcome.extras)  # as the daemon records it
            elapsed = time.perf_counter() - started
            return elapsed, outcome.result

        job("warmup", PLAIN)
        plain, extras = [], []
        for i in range(args.repeat):  # alternate, so drift in the machine's load hits both alike
            plain.append(job(f"plain{i}", PLAIN))
            extras.append(job(f"extras{i}", EXTRAS))
        without, result = min(plain, key=lambda run: run[0])
        with_extras, _ = min(extras, key=lambda run: run[0])
        features = result["features"]
        timings = result["samwatch"]["timings"]
        vertices = sum(len(ring) for f in features for poly in
                       ([f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon" else f["geometry"]["coordinates"])
                       for ring in poly)

        media = probe(config.inbox / "img.png")
        sidecar = validate_sidecar({"prompts": prompts}, name="x.yaml")
        alone = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            result_extras(runner.shapes, media, sidecar, OutputPlan(preview=True, labels=True))
            alone.append(time.perf_counter() - started)
        outputs = JobOutputs(config.outbox, f"extras{args.repeat - 1}")
        sizes = {p.name.split(".", 1)[1]: p.stat().st_size for p in [outputs.result, *outputs.extras]}
        print(f"job with preview + labels {with_extras:.3f} s vs without {without:.3f} s: "
              f"ratio {with_extras / without:.3f}x (target <= 1.15x)")
        print(f"the extras alone {min(alone):.3f} s (preview, label OME-TIFF, CSV in one pass over the features); "
              f"the job's polygons {timings['geometry']:.3f} s for {len(features)} features, {vertices} vertices")
        print(f"sizes: {sizes}, {len(features)} features")
        print(f"device={device} model={args.model} image={args.size}x{args.size} objects={args.objects} "
              f"torch_threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
