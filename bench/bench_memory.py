"""Peak and after-job memory of samwatch jobs, each in a fresh process, against upstream's.

    python bench/bench_memory.py [--only boxes,automask,tiled,upstream,microsam] [--points 32]
                                 [--tile-points 16] [--boxes 1000] [--box-side 8192] [--eager]

Every scenario runs in its own subprocess with random vit_t weights (no downloads here): a
warm-up job loads the model (ONNX Runtime encoder and decoder unless ``--eager``) and makes the
exports, then the RSS settles: that is *idle*, the level with the model loaded. The measured job
follows; its *peak* is the kernel's high-water mark over it (VmHWM, reset at the start), *after*
the RSS once the job has ended and memory.give_back has run, as the daemon does after each job.
Bars (issue 24): automask 1024², 32² points in batches of 64: peak over idle <= 1024 MiB, and the
same for a 4096² tiled automask; after <= 256 MiB over idle.

Scenarios: ``boxes`` (``--boxes`` boxes on a ``--box-side``² image; masks cut to their boxes, as
a trained model's lie around them, so what is measured is what the pipeline holds, not the size
of random blobs' polygons), ``automask`` (1024², ``--points``² points, batches of 64),
``tiled`` (4096² tiled automask, ``--tile-points``² points per 1024 window, filters off and the
weights made decisive as in bench_tiling.py), ``upstream`` (mobile_sam's own SamAutomaticMaskGenerator on the 1024² job,
as samwatch ran it before: whole batches upsampled to the image's size) and ``microsam`` (micro-sam's
TiledAutomaticMaskGenerator on the 4096² job, if micro-sam is importable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 2**20
SCENARIOS = ("boxes", "automask", "tiled", "upstream", "microsam")


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
    from samwatch.models import sam1

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


def settled_rss() -> int:
    from samwatch.memory import give_back, rss_bytes

    give_back()
    last = rss_bytes()
    for _ in range(20):
        time.sleep(0.25)
        now = rss_bytes()
        if abs(now - last) < 4 * MiB:
            return now
        last = now
    return last


# ---- in the child -------------------------------------------------------------------------


def decisive(checkpoint: Path) -> Path:
    """The random weights with their hypernetwork scaled (bench_tiling.py, tests/conftest.py), for
    the two tiled scenarios: with logits near 0 every mask is noise the size of its tile, and
    micro-sam then spends hours on them (two runs were stopped after 17 and 24 CPU minutes)."""
    from bench_tiling import conditioned

    return conditioned(checkpoint)


def samwatch_job(root: Path, args: argparse.Namespace, scenario: str) -> dict:
    import torch
    import yaml
    from PIL import Image

    from samwatch.config import Config
    from samwatch.job.runner import JobRunner
    from samwatch.media.files import content_hash
    from samwatch.memory import PeakMeter, give_back
    from samwatch.models.device import pick_device
    from samwatch.models.pool import ModelPool
    from samwatch.models.sam1 import build_predictor
    from samwatch.control.outbox import JobOutputs
    from samwatch.vocab import JobTicket, Progress
    from samwatch.weights.registry import WeightsRegistry

    torch.manual_seed(0)
    checkpoint = root / "vit_t.pt"
    torch.save(build_predictor("vit_t", None).model.state_dict(), checkpoint)
    if scenario == "tiled":
        checkpoint = decisive(checkpoint)
    config = Config(inbox=root / "inbox", outbox=root / "outbox", state_dir=args.state or root / "state", device="cpu",
                    weights=[{"name": "default", "type": "vit_t", "path": str(checkpoint)}],
                    models={"accelerate": {"cpu": [] if args.eager else ["onnxruntime"]}})
    config.inbox.mkdir(parents=True)
    pool = ModelPool(pick_device("cpu"), config.models, cache_dir=config.state_dir / "encoders")
    runner = JobRunner(config, WeightsRegistry(config.weights, config.state_dir), pool, 1)

    def job(name: str, image: str, body: dict) -> int:
        (config.inbox / f"{name}.yaml").write_text(yaml.safe_dump({"model": "vit_t", "image": image, **body}))
        outcome = runner.run(JobTicket(name, f"{name}.yaml", image, content_hash(config.inbox / image), name),
                             Progress(JobOutputs(config.outbox, name), threading.Event()))
        if outcome.state != "done":
            raise SystemExit(f"job {name} {outcome.state}: {outcome.error and outcome.error.message}")
        return outcome.features

    Image.fromarray(test_image(256)).save(config.inbox / "warm.png")
    job("warm", "warm.png", {"prompts": [{"bbox": [10, 10, 100, 100]}]})
    if scenario == "boxes":
        limit_masks_to_their_boxes()
        side, body = args.box_side, {"prompts": [{"bbox": box} for box in boxes(args.boxes, args.box_side)]}
    elif scenario == "automask":
        side, body = 1024, {"automask": {"points_per_side": args.points, "points_per_batch": 64}}
    else:
        side, body = 4096, {"automask": {"points_per_side": args.tile_points, "points_per_batch": 64,
                                         "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}
    Image.fromarray(test_image(side)).save(config.inbox / "big.png", compress_level=1)
    idle = settled_rss()
    meter = PeakMeter()
    meter.start()
    started = time.perf_counter()
    features = job("big", "big.png", body)
    seconds = time.perf_counter() - started
    peak = meter.peak()
    give_back()
    return {"idle": idle, "peak": peak, "after": settled_rss(), "seconds": seconds, "objects": features}


def upstream_job(root: Path, args: argparse.Namespace) -> dict:
    import torch
    from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, build_sam_vit_t

    from samwatch.memory import PeakMeter

    torch.manual_seed(0)
    predictor = SamPredictor(build_sam_vit_t().eval())
    rgb = np.repeat(test_image(1024)[..., None], 3, axis=2)
    predictor.set_image(rgb[:256, :256])
    idle = settled_rss()
    meter = PeakMeter()
    meter.start()
    started = time.perf_counter()
    generator = SamAutomaticMaskGenerator(predictor.model, points_per_side=args.points, points_per_batch=64)
    count = len(generator.generate(rgb))
    seconds = time.perf_counter() - started
    peak = meter.peak()
    del generator
    return {"idle": idle, "peak": peak, "after": settled_rss(), "seconds": seconds, "objects": count}


def microsam_job(root: Path, args: argparse.Namespace) -> dict | None:
    try:
        from micro_sam import util
        from micro_sam.instance_segmentation import TiledAutomaticMaskGenerator
    except ImportError as exc:
        return {"skipped": f"micro-sam not importable ({exc})"}
    import torch
    from mobile_sam import build_sam_vit_t

    from samwatch.memory import PeakMeter

    torch.manual_seed(0)
    checkpoint = root / "vit_t.pt"
    torch.save(build_sam_vit_t().state_dict(), checkpoint)
    checkpoint = decisive(checkpoint)
    predictor = util.get_sam_model(model_type="vit_t", checkpoint_path=str(checkpoint), device="cpu")
    image = np.repeat(test_image(4096)[..., None], 3, axis=2)
    idle = settled_rss()
    meter = PeakMeter()
    meter.start()
    started = time.perf_counter()
    halo, tile_shape = (64, 64), (1024 - 128, 1024 - 128)
    embeddings = util.precompute_image_embeddings(predictor, image, save_path=str(root / "emb.zarr"),
                                                  tile_shape=tile_shape, halo=halo, verbose=False)
    generator = TiledAutomaticMaskGenerator(predictor, points_per_side=args.tile_points)
    generator.initialize(image, image_embeddings=embeddings, tile_shape=tile_shape, halo=halo)
    count = len(generator.generate(pred_iou_thresh=0.0, stability_score_thresh=0.0))
    seconds = time.perf_counter() - started
    peak = meter.peak()
    del generator, embeddings
    return {"idle": idle, "peak": peak, "after": settled_rss(), "seconds": seconds, "objects": count}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        if args.child == "upstream":
            result = upstream_job(root, args)
        elif args.child == "microsam":
            result = microsam_job(root, args)
        else:
            result = samwatch_job(root, args, args.child)
    print("RESULT " + json.dumps(result))


# ---- the parent ---------------------------------------------------------------------------


def run_child(scenario: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", scenario, *argv], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"skipped": f"failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--points", type=int, default=32, help="automask points per side on 1024²")
    parser.add_argument("--tile-points", type=int, default=16, help="points per side per window on 4096²")
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--box-side", type=int, default=8192)
    parser.add_argument("--eager", action="store_true", help="eager PyTorch instead of ONNX Runtime")
    parser.add_argument("--state", type=Path, default=None, help="a state_dir to keep ONNX exports between runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    argv = [f"--points={args.points}", f"--tile-points={args.tile_points}", f"--boxes={args.boxes}",
            f"--box-side={args.box_side}", *(["--eager"] if args.eager else []),
            *([f"--state={args.state}"] if args.state else [])]
    labels = {
        "boxes": f"{args.boxes} boxes on {args.box_side}²",
        "automask": f"automask 1024², {args.points}² points, batches of 64",
        "tiled": f"tiled automask 4096², {args.tile_points}² points per window, filters off",
        "upstream": f"upstream SamAutomaticMaskGenerator 1024², {args.points}² points",
        "microsam": f"micro-sam tiled automask 4096², {args.tile_points}² points per tile, filters off",
    }
    results = {}
    for scenario in args.only.split(","):
        result = results[scenario] = run_child(scenario, argv)
        if "skipped" in result:
            print(f"{labels[scenario]:62s} skipped: {result['skipped']}")
            continue
        print(f"{labels[scenario]:62s} idle {result['idle'] / MiB:6.0f} MiB  peak +{(result['peak'] - result['idle']) / MiB:5.0f} MiB"
              f"  after +{(result['after'] - result['idle']) / MiB:5.0f} MiB  {result['seconds']:6.1f} s  "
              f"{result['objects']} objects")
    ours, theirs = results.get("automask"), results.get("upstream")
    if ours and theirs and "skipped" not in ours and "skipped" not in theirs:
        print(f"automask peak over idle, samwatch / upstream: "
              f"{(ours['peak'] - ours['idle']) / max(1, theirs['peak'] - theirs['idle']):.2f}")
    ours, theirs = results.get("tiled"), results.get("microsam")
    if ours and theirs and "skipped" not in ours and "skipped" not in theirs:
        print(f"tiled automask peak over idle, samwatch / micro-sam: "
              f"{(ours['peak'] - ours['idle']) / max(1, theirs['peak'] - theirs['idle']):.2f}")


if __name__ == "__main__":
    main()
