"""Frames per second of samwatch's SAM2 video tracking against sam2's own SAM2VideoPredictor.

Both sides get the same random weights (seeded), the same frames and the same prompts, in one
process. The frames (a camera pan across skimage's ``coffee``) are written once as JPEG: the
direct predictor reads the folder with ``init_state`` as samapi does, samwatch reads the same
JPEGs back through a stand-in ``Media``, so the pixels are identical. Each side's time covers
everything from frames on disk to masks on the host: state set-up (sam2 decodes every frame
there; samwatch decodes lazily), prompting and propagation. A short warm-up run of each side
comes first so neither pays one-off costs (samwatch's predictor build is reported apart); then
the two alternate ``--repeats`` times and the best time of each is kept.

    python bench/bench_video.py [--device cuda|cpu] [--frames 8] [--image-size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import data

from samwatch.models.base import RunContext
from samwatch.models.sam2_video import track, video_predictor
from samwatch.sidecars.schema import Sidecar

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
CROP = (352, 512)  # frame height, width
PAN = 8  # pixels the window moves per frame
OBJECTS = {
    0: [
        {"obj_id": 1, "bbox": [150, 100, 330, 260]},
        {"obj_id": 2, "points": [[400, 200], [60, 300]], "point_labels": [1, 0]},
    ]
}


class JpegMedia:
    """The duck type of samwatch.media.read.Media over a folder of JPEG frames."""

    def __init__(self, folder: Path) -> None:
        self.paths = sorted(folder.glob("*.jpg"), key=lambda path: int(path.stem))
        self.n_frames = len(self.paths)
        self.width, self.height = Image.open(self.paths[0]).size

    def frame(self, index: int) -> np.ndarray:
        return np.array(Image.open(self.paths[index]).convert("RGB"))


def write_frames(folder: Path, n_frames: int) -> None:
    image = data.coffee()
    height, width = CROP
    room = image.shape[1] - width
    for index in range(n_frames):
        x = abs(PAN * index % (2 * room) - room)  # back and forth, so any length fits
        Image.fromarray(image[:height, x : x + width]).save(folder / f"{index}.jpg", quality=95)


Masks = dict[tuple[int, int], np.ndarray]


def run_direct(predictor: Any, folder: Path) -> Masks:
    """samapi's get_video_segments: init_state on the folder, prompts, propagate."""
    state = predictor.init_state(video_path=str(folder))
    for frame_idx, objects in OBJECTS.items():
        for obj in objects:
            points = obj.get("points")
            predictor.add_new_points_or_box(
                state, frame_idx, obj["obj_id"], points=points,
                labels=obj.get("point_labels") if points else None, box=obj.get("bbox"),
            )
    masks: Masks = {}
    for frame_idx, obj_ids, logits in predictor.propagate_in_video(state):
        frame_masks = (logits[:, 0] > 0).cpu().numpy()
        masks.update({(frame_idx, obj_id): frame_masks[i] for i, obj_id in enumerate(obj_ids)})
    return masks


def run_samwatch(adapter: SimpleNamespace, folder: Path) -> Masks:
    sidecar = Sidecar.model_validate({"model": "sam2_t", "video": {"objects": OBJECTS}})
    ctx = RunContext(sidecar=sidecar, image=None, image_key="", frames=JpegMedia(folder))
    return {(d.frame, d.obj_id): d.mask for d in track(adapter, ctx)}


def timed(device: torch.device, run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def min_iou(ours: Masks, theirs: Masks) -> float:
    """Worst agreement over object-frames where either side found a mask (1.0: identical)."""
    keys = set(ours) | {key for key, mask in theirs.items() if mask.any()}
    empty = np.zeros(next(iter(theirs.values())).shape, dtype=bool)
    ious = [
        np.logical_and(ours.get(k, empty), theirs.get(k, empty)).sum()
        / np.logical_or(ours.get(k, empty), theirs.get(k, empty)).sum()
        for k in keys
    ]
    return float(min(ious, default=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=1024, help="the model's input size (sam2: 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs; the best of each is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    overrides = [f"++model.image_size={args.image_size}"]
    torch.manual_seed(args.seed)
    model = build_sam2(CONFIG, None, device=device, hydra_overrides_extra=overrides)
    adapter = SimpleNamespace(model=model, device=device, config_used=CONFIG)
    direct = build_sam2_video_predictor(CONFIG, None, device=device, hydra_overrides_extra=overrides)
    direct.load_state_dict(model.state_dict())
    build_s, _ = timed(device, lambda: video_predictor(adapter))

    with tempfile.TemporaryDirectory() as tmp:
        warm, folder = Path(tmp, "warm"), Path(tmp, "frames")
        warm.mkdir()
        folder.mkdir()
        write_frames(warm, 2)
        write_frames(folder, args.frames)
        run_direct(direct, warm)
        run_samwatch(adapter, warm)
        direct_s = ours_s = float("inf")
        for _ in range(args.repeats):
            seconds, theirs = timed(device, lambda: run_direct(direct, folder))
            direct_s = min(direct_s, seconds)
            seconds, ours = timed(device, lambda: run_samwatch(adapter, folder))
            ours_s = min(ours_s, seconds)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}; {args.frames} frames of {CROP[1]}×{CROP[0]}, model input {args.image_size}, 2 objects")
    print(f"video predictor build (once per loaded model): {build_s:.2f} s")
    print(f"sam2 SAM2VideoPredictor: {args.frames / direct_s:7.2f} frames/s ({direct_s:.2f} s)")
    print(f"samwatch track():        {args.frames / ours_s:7.2f} frames/s ({ours_s:.2f} s)")
    print(f"time ratio samwatch / sam2: {ours_s / direct_s:.3f} (target <= 1.15)")
    print(f"masks: {len(ours)} object-frames found, min IoU against sam2 {min_iou(ours, theirs):.4f}")


if __name__ == "__main__":
    main()
