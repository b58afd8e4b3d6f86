"""Speed against samapi and the upstream predictor: every figure a ratio within one run.

    python bench/bench_speed.py [--model vit_t] [--device cpu] [--repeats 3] [--burst 50] [--compile]

1. image encode: samwatch's accelerated encoder (models.accelerate for the device) vs the
   upstream eager ``SamPredictor.set_image``, same preprocessing       target <= 0.5x,
   with the masks of 20 boxes compared (IoU >= 0.98) and the embeddings' largest difference;
   ``--compile`` also times torch.compile (its first call compiles, ~1 min on 2 cores)
2. a 20-box job (image file -> sidecar -> GeoJSON file) vs a samapi-style loop on the same
   image and checkpoint: set_image once, predict per box, skimage ``find_contours`` largest
   contour, GeoJSON written with json                                    target <= 0.5x
3. a burst of jobs (each its own image) through the local executor as the daemon drives it,
   pipelined (executor.pipeline_depth 3) vs one by one (depth 1), reading, tracing and writing
   every output included; and how busy the device stage was kept        target >= 1.3x
4. geometry: the same object in ever larger frames (cost follows the boundary, not the frame);
   a 10⁶-vertex result encoded with orjson vs json

Random weights (no downloads here), made well-conditioned: the mask decoder's hypernetwork
output layers are scaled ×200 so mask logits lie far from 0 (tests/test_accelerate.py does the
same), which makes IoU between two paths meaningful. Times are best-of ``--repeats``, the two
sides of each ratio interleaved so that load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_core import boxes, real_image  # noqa: E402
from bench_geometry import best_times  # noqa: E402

from samwatch.config import Config  # noqa: E402
from samwatch.geometry import iou, mask_to_geometry  # noqa: E402
from samwatch.executors.base import Dispatch, Finished  # noqa: E402
from samwatch.executors.local import LocalExecutor  # noqa: E402
from samwatch.jobs import JobRunner  # noqa: E402
from samwatch.models.accel import Accelerator  # noqa: E402
from samwatch.vocab import LoadSpec  # noqa: E402
from samwatch.models.device import pick_device  # noqa: E402
from samwatch.models.pool import ModelPool  # noqa: E402
from samwatch.models.sam1 import build_predictor  # noqa: E402
from samwatch.outbox import JobOutputs  # noqa: E402
from samwatch.weights.registry import WeightsRegistry  # noqa: E402
from samwatch.vocab import JobTicket, Progress  # noqa: E402

HYPERNETWORK_GAIN = 200.0


def conditioned_checkpoint(model: str, path: Path) -> None:
    torch.manual_seed(0)
    predictor = build_predictor(model, None)
    with torch.no_grad():
        for mlp in predictor.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(HYPERNETWORK_GAIN)
            mlp.layers[-1].bias.mul_(HYPERNETWORK_GAIN)
    torch.save(predictor.model.state_dict(), path)


def samapi_feature(mask: np.ndarray, index: int) -> dict:
    """samapi's mask -> GeoJSON: the largest find_contours contour of the padded mask."""
    from skimage import measure

    contours = measure.find_contours(np.pad(mask, 1), 0.5)
    if not contours:
        return {}
    ring = (max(contours, key=len) - 1)[:, ::-1].tolist()
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"object_idx": index, "label": "object", "sam_model": "vit_t"}}


class Speed:
    def __init__(self, model: str, device: str, root: Path, images: int) -> None:
        self.model = model
        self.device = pick_device(device)
        self.checkpoint = root / f"{model}.pt"
        conditioned_checkpoint(model, self.checkpoint)
        self.config = Config(
            inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state", device=device,
            weights=[{"name": "default", "type": model, "path": str(self.checkpoint)}],
        )
        self.config.inbox.mkdir(parents=True)
        self.config.outbox.mkdir(parents=True)
        self.registry = WeightsRegistry(self.config.weights, self.config.state_dir)
        self.pool = ModelPool(self.device, self.config.models, cache_dir=self.config.state_dir / "encoders")
        self.runner = JobRunner(self.config, self.registry, self.pool)
        base = real_image()
        for index in range(images):  # distinct pixels: no job reuses another's embedding
            Image.fromarray(np.roll(base, 7 * index, axis=1)).save(self.config.inbox / f"img{index}.png")
        self.eager = build_predictor(model, torch.load(self.checkpoint, weights_only=True),
                                     LoadSpec(model, self.checkpoint, "default"))
        self.eager.model.to(self.device)
        self.adapter = self.pool.get(self.registry.request(model, "default"))

    def sidecar(self, name: str, image: str, prompts: list[list[float]]) -> JobTicket:
        (self.config.inbox / f"{name}.yaml").write_text(
            yaml.safe_dump({"model": self.model, "image": image, "prompts": [{"bbox": b} for b in prompts]}))
        return JobTicket(name, f"{name}.yaml", image, None, name)

    def job(self, ticket: JobTicket) -> None:
        """One job as the daemon runs it: the runner's phases, then the result written."""
        outputs = JobOutputs(self.config.outbox, ticket.job_id)
        outcome = self.runner.run(ticket, Progress(outputs, threading.Event()))
        assert outcome.state == "done", outcome.error
        outputs.done(outcome.result, outcome.summary)

    def samapi_loop(self, image_name: str, prompts: list[list[float]]) -> None:
        image = np.asarray(Image.open(self.config.inbox / image_name).convert("RGB"))
        self.eager.set_image(image)
        features = []
        for index, box in enumerate(prompts):
            masks, _, _ = self.eager.predict(box=np.array(box), multimask_output=False)
            features.append(samapi_feature(masks[0], index))
        (self.config.outbox / "samapi.geojson").write_text(json.dumps(features))


def encode_section(speed: Speed, repeats: int, with_compile: bool) -> None:
    image = np.asarray(Image.open(speed.config.inbox / "img0.png").convert("RGB"))
    fast = speed.adapter.predictor
    eager_s, fast_s = best_times([lambda: speed.eager.set_image(image), lambda: fast.set_image(image)], repeats)
    prompts = boxes(20, seed=3)
    with torch.inference_mode():
        speed.eager.set_image(image)
        fast.set_image(image)
        ious = [iou(speed.eager.predict(box=np.array(b), multimask_output=False)[0][0],
                    fast.predict(box=np.array(b), multimask_output=False)[0][0]) for b in prompts]
        scale = speed.eager.features.abs().max().item()
        diff = (fast.features - speed.eager.features).abs().max().item()
    print(f"1. image encode ({speed.adapter.encoder_path}) {fast_s:.3f} s vs eager upstream set_image {eager_s:.3f} s: "
          f"{fast_s / eager_s:.2f}x (target <= 0.5x); masks of 20 boxes IoU min {min(ious):.4f} mean "
          f"{np.mean(ious):.4f} (target >= 0.98); embedding max |diff| {diff:.2e} of max |value| {scale:.2f}")
    decoder = fast.model.mask_decoder  # on the fast predictor's embedding: the decoder alone differs

    def predict_all(module: torch.nn.Module):
        def run() -> list[np.ndarray]:
            fast.model.mask_decoder = module
            try:
                return [fast.predict(box=np.array(b), multimask_output=False)[0][0] for b in prompts]
            finally:
                fast.model.mask_decoder = decoder
        return run

    with torch.inference_mode():
        eager_d, fast_d = best_times([predict_all(decoder.eager), predict_all(decoder)], repeats)
        ious = [iou(a, b) for a, b in zip(predict_all(decoder.eager)(), predict_all(decoder)())]
    print(f"   mask decoder ({decoder.path}) {fast_d / len(prompts) * 1e3:.1f} ms vs eager "
          f"{eager_d / len(prompts) * 1e3:.1f} ms per box predict: {fast_d / eager_d:.2f}x; IoU of 20 boxes min "
          f"{min(ious):.4f} mean {np.mean(ious):.4f}")
    if with_compile:
        encoder = speed.eager.model.image_encoder
        compiled = Accelerator(("compile",), speed.device, None).wrap(
            encoder, model_type=speed.model, weights_sha="bench", input_shape=(1, 3, 1024, 1024))
        x = torch.randn(1, 3, 1024, 1024, device=speed.device)
        with torch.inference_mode():
            started = time.perf_counter()
            compiled(x)
            first = time.perf_counter() - started
            eager_e, compiled_e = best_times([lambda: encoder(x), lambda: compiled(x)], repeats)
        print(f"   torch.compile: first call {first:.1f} s, then {compiled_e:.3f} s vs eager {eager_e:.3f} s: "
              f"{compiled_e / eager_e:.2f}x ({compiled.path})")


def job_section(speed: Speed, repeats: int) -> None:
    prompts = boxes(20)
    counter = iter(range(10**6))

    def ours() -> None:  # a fresh image key each time: the encoder runs, as in samapi's loop
        ticket = speed.sidecar("twenty", "img0.png", prompts)
        speed.job(JobTicket(ticket.job_id, ticket.sidecar, ticket.image, f"fresh{next(counter)}", ticket.version))

    samapi_s, ours_s = best_times([lambda: speed.samapi_loop("img0.png", prompts), ours], repeats)
    result = json.loads((speed.config.outbox / "twenty.geojson").read_text())
    timings = result["samwatch"]["timings"]
    print(f"2. 20-box job {ours_s:.3f} s vs samapi-style loop {samapi_s:.3f} s: {ours_s / samapi_s:.2f}x "
          f"(target <= 0.5x); job timings {timings}, encoder {result['samwatch']['image_encoder']}")


def run_burst(speed: Speed, tickets: list[JobTicket], depth: int) -> tuple[float, float]:
    """The tickets through the local executor as the daemon drives it: dispatch while a slot
    has room, write each progress report and result from this (the loop's) thread. Returns
    (wall seconds, the device stage's busy seconds, CPU cores used on average)."""
    config = speed.config.model_copy(update={"executor": speed.config.executor.model_copy(update={"pipeline_depth": depth})})
    executor = LocalExecutor(config, speed.registry, [speed.pool])
    pending, finished = list(tickets), 0
    process = psutil.Process()
    cpu_before = sum(process.cpu_times()[:2])
    started = time.perf_counter()
    while finished < len(tickets):
        while pending and executor.free_slots() > 0:
            executor.submit(Dispatch(pending.pop(0), f"token{len(pending)}"))
        for event in executor.poll(0.05):
            outputs = JobOutputs(speed.config.outbox, event.job_id)
            if isinstance(event, Finished):
                assert event.outcome.state == "done", event.outcome.error
                outputs.done(event.outcome.result, event.outcome.summary, event.outcome.extras)
                finished += 1
            else:
                outputs.running(event.stage, event.percent, event.message)
    wall = time.perf_counter() - started
    cores = (sum(process.cpu_times()[:2]) - cpu_before) / wall
    busy = executor.workers()[0]["device_busy_seconds"]
    executor.close()
    return wall, busy, cores


def burst_section(speed: Speed, count: int) -> None:
    prompts = boxes(20, seed=5)
    tickets = [speed.sidecar(f"burst{i}", f"img{i}.png", prompts) for i in range(count)]

    def fresh(round_name: str) -> list[JobTicket]:  # new image keys: every job encodes its image
        return [JobTicket(t.job_id, t.sidecar, t.image, f"{round_name}{i}", t.version) for i, t in enumerate(tickets)]

    singles, single_busy, single_cores = run_burst(speed, fresh("single"), depth=1)
    piped, piped_busy, piped_cores = run_burst(speed, fresh("piped"), depth=3)
    print(f"3. burst of {count} 20-box jobs through the local executor: pipeline_depth 3 {piped:.2f} s vs "
          f"one by one (depth 1) {singles:.2f} s: {singles / piped:.2f}x the throughput (target >= 1.3x); "
          f"device stage busy {100 * piped_busy / piped:.0f}% of the burst pipelined, "
          f"{100 * single_busy / singles:.0f}% one by one; CPU cores used {piped_cores:.2f} vs {single_cores:.2f} "
          f"of {psutil.cpu_count()}")


def geometry_section() -> None:
    from skimage import draw

    times = []
    for side in (1024, 4096, 8192):
        mask = np.zeros((side, side), bool)
        rr, cc = draw.ellipse(side // 2, side // 2, 60, 90, shape=mask.shape)
        mask[rr, cc] = True
        times.append(best_times([lambda m=mask: mask_to_geometry(m)], 5)[0])
    print(f"4. one 180x120 px object traced in frames of 1024² / 4096² / 8192²: "
          + " / ".join(f"{t * 1e3:.2f} ms" for t in times)
          + f" ({times[-1] / times[0]:.1f}x for 64x the pixels: the frame costs only a bounding-box scan)")
    rng = np.random.default_rng(0)
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        rng.integers(0, 10**5, (1000, 2)).tolist()]}, "properties": {"object_idx": i, "quality": 0.9}}
        for i in range(1000)]
    collection = {"type": "FeatureCollection", "features": features}
    slow, fast = best_times([lambda: json.dumps(collection, separators=(",", ":")).encode(),
                          lambda: orjson.dumps(collection)], 3)
    print(f"   GeoJSON of 10⁶ vertices: orjson {fast * 1e3:.0f} ms vs json {slow * 1e3:.0f} ms: {slow / fast:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="1234", help="sections to run, e.g. 13")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all cores, at most 16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), 16))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        speed = Speed(args.model, args.device, Path(tmp), images=max(args.burst, 1))
        print(f"setup (model load, encoder export) {time.perf_counter() - started:.1f} s; device={speed.device} "
              f"model={args.model} torch_threads={torch.get_num_threads()} encoder={speed.adapter.encoder_path}")
        if "1" in args.only:
            encode_section(speed, args.repeats, args.compile)
        if "2" in args.only:
            job_section(speed, args.repeats)
        if "3" in args.only:
            burst_section(speed, args.burst)
        if "4" in args.only:
            geometry_section()


if __name__ == "__main__":
    main()
