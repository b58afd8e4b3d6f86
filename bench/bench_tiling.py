"""Tiled segmentation: automask on 4096² vs micro-sam, peak RSS on 4k/16k/40k slides, 50 boxes on 40k.

    python bench/bench_tiling.py [--parts automask rss boxes] [--points 4] [--sizes 4096 16384 40000]
                                 [--boxes 50] [--no-microsam]

All models are a random-weight vit_t (no downloads here), built once and saved as the checkpoint
both samwatch and micro-sam load. On 2 shared CPU cores the automask grid is cut to
``--points``² points per tile (default 4² = 16) and the quality filters are off (random
weights predict IoUs near 0), so counts compare the two pipelines, not the masks' quality.

1. **Automask on a 4096² image** (scikit-image content), 1024-px windows with a 128-px overlap
   (micro-sam: tile_shape 896 + halo 64 on each side: the same 25 windows): samwatch's tiled
   automask (read, encode, decode, stitch) vs micro-sam 1.8.14's ``TiledAutomaticMaskGenerator``
   (``precompute_image_embeddings`` to zarr + ``initialize`` + ``generate``), seconds and object
   counts; then samwatch again with its disk cache warm.                target: <= 1.0x micro-sam
   micro-sam is not a samwatch dependency, and ``pip install micro-sam`` would put ~130 packages
   (napari, PyQt6, and segment-anything-py, which shadows segment_anything) into the venv; install
   it aside instead: ``pip install --target /tmp/msam --no-deps micro-sam==1.8.14 torch_em
   python-elf bioimage-cpp==0.10.0 matplotlib scikit-learn kiwisolver cycler fonttools contourpy
   pyparsing python-dateutil threadpoolctl joblib narwhals kornia kornia_rs pandas pooch
   platformdirs xxhash`` and run with ``PYTHONPATH=$PWD:/tmp/msam``.
2. **Peak RSS** of a whole tiled automask job (the real ``JobRunner``: slide reader, tiles,
   stitching, polygons, result file) on mostly-white pyramidal OME-TIFF slides of each size with
   skimage patches, each in its own process. The model is a stand-in that finds dark connected
   blobs in a tile (a vit_t costs a second per tile: 2025 tiles on 40k), so what is measured is
   everything that could grow with the slide; the model's own memory is one window's.
                                                                          target: 40k < 2x 4k
3. **50 boxes spread over the 40k slide** with vit_t: seconds, windows encoded, and again after the
   sidecar changed (tile embeddings from the disk cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from samwatch.config import Config  # noqa: E402
from samwatch.media.read import MediaLimits  # noqa: E402
from samwatch.models.base import Detection, ModelAdapter, RunContext  # noqa: E402
from samwatch.vocab import LoadSpec  # noqa: E402
from samwatch.models.sam1 import Adapter  # noqa: E402
from samwatch.sidecars.schema import validate_sidecar  # noqa: E402
from samwatch.media.slides import ArraySource  # noqa: E402
from samwatch.tiling.cache import TileEmbeddingStore  # noqa: E402
from samwatch.tiling.segment import TilingReport, plan_for, segment  # noqa: E402
from samwatch.tiling.tile import TileJob  # noqa: E402
from slides import SparseSlide, skimage_content, write_ome_pyramid  # noqa: E402

TILE, OVERLAP = 1024, 128


def vit_t_checkpoint(folder: Path) -> Path:
    from mobile_sam import build_sam_vit_t

    torch.manual_seed(0)
    path = folder / "vit_t_random.pt"
    torch.save(build_sam_vit_t().state_dict(), path)
    return path


def automask_params(points: int) -> dict:
    return {"points_per_side": points, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
            "include_image_edge": True}


# -- 1. automask vs micro-sam ------------------------------------------------------------------


def samwatch_automask(adapter: Adapter, image: np.ndarray, points: int, store: TileEmbeddingStore | None) -> tuple[float, int, dict]:
    sidecar = validate_sidecar({"automask": automask_params(points), "tiling": {"tile_size": TILE, "overlap": OVERLAP}},
                               name="bench")
    source = ArraySource(Path("bench.png"), image, MediaLimits())
    plan = plan_for(sidecar, source)
    report = TilingReport(plan)
    job = TileJob(sidecar=sidecar, image_key="bench-4096", embedding_store=store)
    started = time.perf_counter()
    count = sum(1 for _ in segment(adapter, source, job, plan, lambda *a: None, report))
    return time.perf_counter() - started, count, report.to_dict()


def microsam_automask(checkpoint: Path, image: np.ndarray, points: int, scratch: Path) -> tuple[float, int] | None:
    try:
        from micro_sam import util
        from micro_sam.instance_segmentation import TiledAutomaticMaskGenerator
    except ImportError as exc:
        print(f"  micro-sam: not importable ({exc}); skipped")
        return None
    predictor = util.get_sam_model(model_type="vit_t", checkpoint_path=str(checkpoint), device="cpu")
    halo = (OVERLAP // 2, OVERLAP // 2)
    tile_shape = (TILE - OVERLAP, TILE - OVERLAP)
    started = time.perf_counter()
    embeddings = util.precompute_image_embeddings(predictor, image, save_path=str(scratch / "emb.zarr"),
                                                  tile_shape=tile_shape, halo=halo, verbose=False)
    generator = TiledAutomaticMaskGenerator(predictor, points_per_side=points)
    generator.initialize(image, image_embeddings=embeddings, tile_shape=tile_shape, halo=halo)
    masks = generator.generate(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return time.perf_counter() - started, len(masks)


def bench_automask(checkpoint: Path, points: int, use_microsam: bool, scratch: Path) -> None:
    print(f"1. automask on 4096² ({TILE}-px windows, overlap {OVERLAP}, {points}² points per window)")
    image = skimage_content(4096, 4096)
    adapter = Adapter()
    adapter.setup(LoadSpec("vit_t", checkpoint, "bench"), torch.device("cpu"), embedding_cache=0)
    store = TileEmbeddingStore(scratch / "tile-embeddings", "bench", 1 << 31)
    seconds, count, report = samwatch_automask(adapter, image, points, store)  # an empty cache: every window encoded
    print(f"  samwatch:  {seconds:7.1f} s  {count:5d} objects  tiles {report['tiles']}, encoded {report['windows_encoded']}")
    store.hits = 0
    warm, warm_count, warm_report = samwatch_automask(adapter, image, points, store)
    print(f"  samwatch, disk cache warm: {warm:7.1f} s  {warm_count:5d} objects  encoded "
          f"{warm_report['windows_encoded']}, cache hits {warm_report['cache_hits']} ({warm / seconds:.2f}x the cold run)")
    theirs = microsam_automask(checkpoint, image, points, scratch) if use_microsam else None
    if theirs is not None:
        print(f"  micro-sam: {theirs[0]:7.1f} s  {theirs[1]:5d} objects")
        print(f"  ratio samwatch / micro-sam: {seconds / theirs[0]:.2f}x time, objects {count} vs {theirs[1]}")


# -- 2. peak RSS over slide sizes --------------------------------------------------------------


class DarkBlobs(ModelAdapter):
    """A stand-in model for memory runs: connected dark blobs of a tile, as automask would report them."""

    modes = frozenset({"automask"})

    def setup(self, spec: LoadSpec, device: torch.device, *, embedding_cache: int = 4) -> None:
        pass

    def parameter_bytes(self) -> int:
        return 0

    def run(self, ctx: RunContext):  # noqa: ANN201
        from skimage.measure import label, regionprops

        ctx.progress("encoding image", 0.0)
        labels = label(ctx.image.mean(axis=2) < 80)
        for region in regionprops(labels):
            if region.area >= 30:
                yield Detection(mask=labels == region.label, score=0.9)


def write_slide(path: Path, size: int) -> Path:
    patches = [(int(size * f) // 64 * 64, int(size * f * 0.7) // 64 * 64, skimage_content(1024, 1024))
               for f in np.linspace(0.1, 0.8, 4)]
    return write_ome_pyramid(path, SparseSlide(size, size, patches=patches), levels=4)


def rss_child(slide: Path, model: str, checkpoint: str) -> None:
    """One whole job in this process; prints its peak RSS (MiB), seconds and result."""
    from samwatch.job.runner import JobRunner
    from samwatch.vocab import JobTicket, Progress
    from samwatch.models.pool import ModelPool
    from samwatch.control.outbox import JobOutputs
    from samwatch.weights.registry import WeightsRegistry

    root = slide.parent
    (root / "slide.ome.yaml").write_text(json.dumps({"model": "vit_t", "automask": automask_params(4)}))
    config = Config(inbox=root, outbox=root / "out", state_dir=root / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": checkpoint}])
    runner = JobRunner(config, WeightsRegistry(config.weights, config.state_dir),
                       ModelPool(torch.device("cpu"), config.models,
                                 adapters=(lambda model_type: DarkBlobs) if model == "stand-in" else None),
                       prompt_batch_size=1)
    outputs = JobOutputs(config.outbox, "slide")
    started = time.perf_counter()
    outcome = runner.run(JobTicket("slide", "slide.ome.yaml", slide.name, "sha", "v1"), Progress(outputs, threading.Event()))
    seconds = time.perf_counter() - started
    meta = outcome.result["samwatch"] if outcome.state == "done" else {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"state": outcome.state, "error": str(outcome.error) if outcome.error else None, "rss_mib": peak,
                      "seconds": seconds, "features": outcome.features, "tiles": meta.get("tiling", {}).get("tiles")}))


def bench_rss(sizes: list[int], checkpoint: Path, scratch: Path) -> None:
    print("2. peak RSS of a whole tiled automask job (stand-in model) per slide size")
    baseline = None
    for size in sizes:
        folder = scratch / f"slide{size}"
        folder.mkdir()
        slide = write_slide(folder / "slide.ome.tif", size)
        out = subprocess.run([sys.executable, __file__, "--child", str(slide), "stand-in", str(checkpoint)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-800:]}
        if "rss_mib" not in result:
            print(f"  {size}²: failed: {result}")
            continue
        baseline = baseline or result["rss_mib"]
        print(f"  {size:6d}²: peak RSS {result['rss_mib']:7.0f} MiB ({result['rss_mib'] / baseline:.2f}x the first), "
              f"{result['tiles']} tiles, {result['features']} features, {result['seconds']:.1f} s, state {result['state']}")


# -- 3. boxes on a 40k slide -------------------------------------------------------------------


def bench_boxes(n_boxes: int, size: int, checkpoint: Path, scratch: Path) -> None:
    print(f"3. {n_boxes} boxes spread over a {size}² slide (vit_t)")
    from samwatch.media.read import open_region_source

    slide = write_slide(scratch / "boxes.ome.tif", size)
    rng = np.random.default_rng(0)
    corners = rng.integers(0, size - 100, (n_boxes, 2))
    boxes = [[float(x), float(y), float(x + 60), float(y + 50)] for x, y in corners]
    adapter = Adapter()
    adapter.setup(LoadSpec("vit_t", checkpoint, "bench"), torch.device("cpu"), embedding_cache=0)
    store = TileEmbeddingStore(scratch / "box-embeddings", "bench", 1 << 31)
    with open_region_source(slide, limits=MediaLimits()) as source:
        for label, shift in (("first run", 0.0), ("sidecar changed (boxes moved 5 px)", 5.0)):
            sidecar = validate_sidecar({"prompts": [{"bbox": [b[0] + shift, b[1], b[2] + shift, b[3]]} for b in boxes]},
                                       name="boxes")
            plan = plan_for(sidecar, source)
            report = TilingReport(plan)
            job = TileJob(sidecar=sidecar, image_key="boxes-40k", embedding_store=store)
            started = time.perf_counter()
            count = sum(1 for _ in segment(adapter, source, job, plan, lambda *a: None, report))
            seconds = time.perf_counter() - started
            print(f"  {label}: {seconds:6.1f} s, {count} masks, windows {report.tiles}, encoded "
                  f"{report.windows_encoded}, disk cache hits {store.hits}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 40000])
    parser.add_argument("--boxes", type=int, default=50)
    parser.add_argument("--no-microsam", action="store_true")
    parser.add_argument("--parts", nargs="+", choices=["automask", "rss", "boxes"], default=["automask", "rss", "boxes"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        rss_child(Path(args.child[0]), args.child[1], args.child[2])
        return
    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
        scratch = Path(tmp)
        checkpoint = vit_t_checkpoint(scratch)
        if "automask" in args.parts:
            bench_automask(checkpoint, args.points, not args.no_microsam, scratch)
        if "rss" in args.parts:
            bench_rss(args.sizes, checkpoint, scratch)
        if "boxes" in args.parts:
            bench_boxes(args.boxes, max(args.sizes), checkpoint, scratch)


if __name__ == "__main__":
    main()
