"""Tiled segmentation: automask on 4096² vs micro-sam, peak RSS on 4k/16k/40k slides, 50 boxes on 40k.

    python bench/bench_tiling.py [--parts automask rss boxes] [--points 8] [--automask-size 4096]
                                 [--sizes 4096 16384 40000] [--boxes 50] [--microsam-path /tmp/msam]

All models are a random-weight vit_t (no downloads here), built once and saved as the checkpoint
both samwatch and micro-sam load; the quality filters are off (random weights predict IoUs near
0), so counts compare the two pipelines, not the masks' quality.

1. **Automask on a 4096² image** (scikit-image content, a piece every 600 px so that its own
   straight edges lie on neither tiling's seams), micro-sam's tiling of tile 1024 + halo
   128 (windows of 1280, 16 of them; samwatch: ``tile_size`` 1280, ``overlap`` 256, the same
   windows), 8² points per window, the hypernetwork scaled as tests/conftest.py does so masks are
   decisive: samwatch's tiled automask (read, encode, decode, stitch, second looks) vs micro-sam
   1.8.14's ``TiledAutomaticMaskGenerator`` (``precompute_image_embeddings`` to zarr +
   ``initialize`` + ``generate``), each in a process of its own, one after the other: seconds,
   peak RSS, objects, edges running straight along a seam for more than 20 px and duplicates
   (mask IoU > 0.5) of both (tests/seams.py).     targets: <= 0.5x the time, <= 0.25x the peak RSS
   micro-sam is not a samwatch dependency, and ``pip install micro-sam`` would put ~130 packages
   (napari, PyQt6, and segment-anything-py, which shadows segment_anything) into the venv; install
   it aside instead (``--no-deps``, the venv's versions untouched):
   ``pip install --target /tmp/msam --no-deps micro-sam==1.8.14 torch-em python-elf bioimage-cpp
   threadpoolctl pooch platformdirs xxhash matplotlib pyparsing cycler python-dateutil kiwisolver
   scikit-learn joblib narwhals kornia kornia_rs pandas`` (the bench puts ``--microsam-path`` on
   the child's PYTHONPATH; ``--microsam-path ''`` skips micro-sam). The micro-sam run takes
   ~400 s and ~9 GB.
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

from samwatch.config import Config, LimitSettings, ModelSettings  # noqa: E402
from samwatch.media.read import MediaLimits  # noqa: E402
from samwatch.models.base import Detection, ModelAdapter, RunContext  # noqa: E402
from samwatch.vocab import LoadSpec  # noqa: E402
from samwatch.models.pool import ModelPool  # noqa: E402
from samwatch.models.sam1 import Adapter  # noqa: E402
from samwatch.sidecars.schema import validate_sidecar  # noqa: E402
from samwatch.media.slides import ArraySource  # noqa: E402
from samwatch.tiling.cache import TileEmbeddingStore  # noqa: E402
from samwatch.tiling.segment import TilingReport, plan_for, segment  # noqa: E402
from samwatch.tiling.tile import TileJob  # noqa: E402
import seams  # noqa: E402
from slides import SparseSlide, skimage_content, write_ome_pyramid  # noqa: E402

TILE, OVERLAP = 1024, 128
MICROSAM_TILE, MICROSAM_HALO = 1024, 128
HYPERNETWORK_GAIN = 200.0  # tests/conftest.py's


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


def conditioned(checkpoint: Path) -> Path:
    """The checkpoint with its hypernetwork output layers scaled, as tests/conftest.py does, so
    masks are decisive (random weights alone give logits near 0)."""
    from mobile_sam import build_sam_vit_t

    model = build_sam_vit_t()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(HYPERNETWORK_GAIN)
            mlp.layers[-1].bias.mul_(HYPERNETWORK_GAIN)
    path = checkpoint.with_name("vit_t_conditioned.pt")
    torch.save(model.state_dict(), path)
    return path


def _checked(crops: list, lines: tuple[set[int], set[int]]) -> dict:
    return {"objects": len(crops), "seam_edges": len(seams.seam_edges(crops, lines)),
            "duplicates": len(seams.duplicates(crops))}


def samwatch_child(pixels: Path, checkpoint: Path, points: int) -> dict:
    """samwatch's tiled automask on the pixels: windows of MICROSAM_TILE + 2 halo, overlap 2 halo."""
    from samwatch.tiling.plan import Rect, plan_tiles

    image = np.load(pixels)
    tiling = {"tile_size": MICROSAM_TILE + 2 * MICROSAM_HALO, "overlap": 2 * MICROSAM_HALO}
    sidecar = validate_sidecar({"automask": automask_params(points), "tiling": tiling}, name="bench")
    # as the daemon runs it: the pool's accelerated paths (ONNX Runtime encoder and decoder on a
    # CPU, exported before the clock starts) and the job's memory budget
    with tempfile.TemporaryDirectory() as exports:
        pool = ModelPool(torch.device("cpu"), ModelSettings(embedding_cache=0), cache_dir=Path(exports))
        adapter = pool.get(LoadSpec("vit_t", checkpoint, "bench"))
        source = ArraySource(Path("bench.png"), image, MediaLimits())
        plan = plan_for(sidecar, source)
        report = TilingReport(plan)
        job = TileJob(sidecar=sidecar, image_key="bench", memory_budget=LimitSettings().max_job_memory)
        started, cpu_started = time.perf_counter(), time.process_time()
        detections = list(segment(adapter, source, job, plan, lambda *a: None, report))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    height, width = image.shape[:2]
    tiles = plan_tiles(Rect(0, 0, width, height), tiling["tile_size"], tiling["overlap"], 1.0, 0)
    crops = [seams.crop_of_detection(d) for d in detections]
    lines = seams.seam_lines(tiles, (0, 0, width, height))
    flagged = [(detections[i].extra["tiling"], axis, line, run) for i, axis, line, run in seams.seam_edges(crops, lines)]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "encoder": adapter.encoder_path,
            "decoder": adapter.decoder_path, **_checked(crops, lines), "seam_edge_views": flagged,
            "tiles": report.tiles, "windows_encoded": report.windows_encoded, "second_looks": report.second_looks}


def microsam_child(pixels: Path, checkpoint: Path, points: int) -> dict:
    from micro_sam import util
    from micro_sam.instance_segmentation import TiledAutomaticMaskGenerator

    image = np.load(pixels)
    predictor = util.get_sam_model(model_type="vit_t", checkpoint_path=str(checkpoint), device="cpu")
    tile_shape, halo = (MICROSAM_TILE, MICROSAM_TILE), (MICROSAM_HALO, MICROSAM_HALO)
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as scratch:
        embeddings = util.precompute_image_embeddings(predictor, image, save_path=str(Path(scratch) / "emb.zarr"),
                                                      tile_shape=tile_shape, halo=halo, verbose=False, ndim=2)
        generator = TiledAutomaticMaskGenerator(predictor, points_per_side=points)
        generator.initialize(image, image_embeddings=embeddings, tile_shape=tile_shape, halo=halo, verbose=False)
        masks = generator.generate(pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="binary_mask",
                                   with_background=False)  # every object, as samwatch keeps them
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    crops = []
    for record in masks:
        x, y, w, h = (int(v) for v in record["bbox"])
        crops.append(seams.Crop(np.asarray(record["segmentation"])[y:y + h + 1, x:x + w + 1], x, y))
    height, width = image.shape[:2]
    lines = ({v for k in range(1, width // MICROSAM_TILE + 1) for v in (k * MICROSAM_TILE - MICROSAM_HALO,
              k * MICROSAM_TILE, k * MICROSAM_TILE + MICROSAM_HALO)} - {0, width},
             {v for k in range(1, height // MICROSAM_TILE + 1) for v in (k * MICROSAM_TILE - MICROSAM_HALO,
              k * MICROSAM_TILE, k * MICROSAM_TILE + MICROSAM_HALO)} - {0, height})
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, **_checked(crops, lines)}


def _in_child(kind: str, pixels: Path, checkpoint: Path, points: int, extra_path: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), extra_path]))
    out = subprocess.run([sys.executable, __file__, "--automask-child", kind, str(pixels), str(checkpoint), str(points)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_automask(checkpoint: Path, points: int, microsam_path: str | None, scratch: Path, size: int) -> None:
    window = MICROSAM_TILE + 2 * MICROSAM_HALO
    print(f"1. automask on {size}²: micro-sam's tile {MICROSAM_TILE} + halo {MICROSAM_HALO} (windows of {window}, "
          f"samwatch tile_size {window}, overlap {2 * MICROSAM_HALO}), {points}² points per window, one process each")
    pixels = scratch / "pixels.npy"
    np.save(pixels, skimage_content(size, size, pitch=600))  # content edges on neither tiling's seams
    weights = conditioned(checkpoint)
    ours = _in_child("samwatch", pixels, weights, points)
    if "error" in ours:
        print(f"  samwatch failed: {ours['error']}")
        return
    print(f"  samwatch:  {ours['seconds']:7.1f} s ({ours['cpu_seconds']:.0f} CPU s, {ours['encoder']} encoder, "
          f"{ours['decoder']} decoder)  peak RSS {ours['rss_mib']:6.0f} MiB  {ours['objects']:5d} objects, "
          f"{ours['seam_edges']} seam edges, {ours['duplicates']} duplicates (tiles {ours['tiles']}, "
          f"{ours['second_looks']} second looks, {ours['windows_encoded']} windows encoded)")
    for tiling, axis, line, run in ours["seam_edge_views"]:
        print(f"    seam edge: {run} px along {axis} = {line}, object seen {tiling}")
    if microsam_path is None:
        return
    theirs = _in_child("microsam", pixels, weights, points, microsam_path)
    if "error" in theirs:
        print(f"  micro-sam failed (install it aside, see the docstring): {theirs['error']}")
        return
    print(f"  micro-sam: {theirs['seconds']:7.1f} s ({theirs['cpu_seconds']:.0f} CPU s)  peak RSS {theirs['rss_mib']:6.0f} MiB  {theirs['objects']:5d} objects, "
          f"{theirs['seam_edges']} seam edges, {theirs['duplicates']} duplicates")
    print(f"  samwatch / micro-sam: {ours['seconds'] / theirs['seconds']:.2f}x time (target <= 0.5x; "
          f"{ours['cpu_seconds'] / theirs['cpu_seconds']:.2f}x CPU time, the figure a busy machine keeps), "
          f"{ours['rss_mib'] / theirs['rss_mib']:.2f}x peak RSS (target <= 0.25x)")


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
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--automask-size", type=int, default=4096, help="side of the automask image")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 40000])
    parser.add_argument("--boxes", type=int, default=50)
    parser.add_argument("--microsam-path", default="/tmp/msam",
                        help="where micro-sam was installed aside (see above); '' skips it")
    parser.add_argument("--parts", nargs="+", choices=["automask", "rss", "boxes"], default=["automask", "rss", "boxes"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--automask-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        rss_child(Path(args.child[0]), args.child[1], args.child[2])
        return
    if args.automask_child:
        kind, pixels, checkpoint, points = args.automask_child
        run = samwatch_child if kind == "samwatch" else microsam_child
        result = run(Path(pixels), Path(checkpoint), int(points))
        print(json.dumps({**result, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
        scratch = Path(tmp)
        checkpoint = vit_t_checkpoint(scratch)
        if "automask" in args.parts:
            bench_automask(checkpoint, args.points, args.microsam_path or None, scratch, args.automask_size)
        if "rss" in args.parts:
            bench_rss(args.sizes, checkpoint, scratch)
        if "boxes" in args.parts:
            bench_boxes(args.boxes, max(args.sizes), checkpoint, scratch)


if __name__ == "__main__":
    main()
