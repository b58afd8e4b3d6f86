"""Stacks and videos through the real job pipeline: tracking, planes, per-plane segmentation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import tifffile
import torch
import yaml
from PIL import Image

from samwatch.config import Config
from samwatch.jobs import JobRunner
from samwatch.models.pool import ModelPool
from samwatch.weights.registry import WeightsRegistry
from samwatch.outbox import JobOutputs
from samwatch.vocab import JobTicket, Progress
from support import coins


def shifted_frames(count: int, size: int = 160) -> list[np.ndarray]:
    """A real image panned a few pixels per frame: objects move like cells in a time lapse."""
    image = coins()
    return [image[20 + 4 * i : 20 + 4 * i + size, 30 + 3 * i : 30 + 3 * i + size].copy() for i in range(count)]


def make_runner(tmp_path: Path, weights: list[dict]) -> JobRunner:
    config = Config(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", state_dir=tmp_path / "state", weights=weights)
    config.inbox.mkdir(parents=True, exist_ok=True)
    registry = WeightsRegistry(config.weights, config.state_dir)
    return JobRunner(config, registry, ModelPool(torch.device("cpu"), config.models), prompt_batch_size=1)


def run(runner: JobRunner, stem: str, image: str, body: dict) -> dict:
    (runner.config.inbox / f"{stem}.yaml").write_text(yaml.safe_dump(body))
    outputs = JobOutputs(runner.config.outbox, stem)
    percents: list[float] = []

    class Recording(Progress):
        def __call__(self, stage: str, fraction: float, message: str = "") -> None:
            super().__call__(stage, fraction, message)
            percents.append(self.percent)

    outcome = runner.run(JobTicket(stem, f"{stem}.yaml", image, f"sha-{stem}", "v"), Recording(outputs, threading.Event(), min_interval=0))
    assert outcome.state == "done", outcome.error and outcome.error.to_dict()
    result = outcome.result
    result["percents"] = percents
    return result


def test_sam2_tracks_through_a_z_stack(tmp_path: Path, sam2_t_checkpoint: Path) -> None:
    runner = make_runner(tmp_path, [{"name": "default", "type": "sam2_t", "path": str(sam2_t_checkpoint)}])
    tifffile.imwrite(runner.config.inbox / "stack.tif", np.stack(shifted_frames(4)), metadata={"axes": "ZYX"})
    result = run(runner, "stack", "stack.tif", {
        "model": "sam2_t",
        "video": {"axes": "XYZ", "start_frame_idx": 1, "max_frame_num_to_track": 2,
                  "objects": {1: [{"obj_id": 7, "bbox": [20, 20, 90, 90]}, {"obj_id": 9, "points": [[120, 120]], "point_labels": [1]}]}},
    })
    frames = {f["properties"]["frame"] for f in result["features"]}
    assert frames <= {1, 2, 3} and frames, frames  # from start_frame_idx, within max_frame_num_to_track
    for feature in result["features"]:
        props = feature["properties"]
        assert props["obj_id"] in (7, 9) and props["object_idx"] == props["obj_id"]
        assert feature["geometry"]["plane"] == {"c": -1, "z": props["frame"], "t": 0}
        assert 0 <= props["quality"] <= 1
    assert result["samwatch"]["image"]["frames"] == 4
    assert result["samwatch"]["weights"]["config"].startswith("configs/sam2.1/")
    tracking = [p for p in result["percents"] if 20 <= p <= 95]
    assert len(tracking) >= 3 and tracking == sorted(tracking)  # progress follows the frames


def test_a_stack_without_video_block_is_segmented_plane_by_plane(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    runner = make_runner(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    folder = runner.config.inbox / "movie.frames"
    folder.mkdir()
    for index, frame in enumerate(shifted_frames(2)):
        Image.fromarray(frame).save(folder / f"t{index + 1}.png")
    result = run(runner, "movie", "movie.frames", {"model": "vit_t", "prompts": [{"bbox": [20, 20, 90, 90]}]})
    planes = sorted(f["geometry"]["plane"]["t"] for f in result["features"])
    assert planes == [0, 1]
    assert all(f["geometry"]["plane"]["z"] == 0 for f in result["features"])


def test_a_still_image_with_a_video_block_is_a_one_frame_sequence(tmp_path: Path, sam2_t_checkpoint: Path) -> None:
    runner = make_runner(tmp_path, [{"name": "default", "type": "sam2_t", "path": str(sam2_t_checkpoint)}])
    Image.fromarray(shifted_frames(1)[0]).save(runner.config.inbox / "still.png")
    result = run(runner, "still", "still.png", {"model": "sam2_t", "video": {"objects": {0: [{"obj_id": 1, "bbox": [20, 20, 90, 90]}]}}})
    assert {f["geometry"]["plane"]["t"] for f in result["features"]} <= {0}


def test_video_too_large_is_refused_before_reading(tmp_path: Path, sam2_t_checkpoint: Path) -> None:
    runner = make_runner(tmp_path, [{"name": "default", "type": "sam2_t", "path": str(sam2_t_checkpoint)}])
    runner.config = runner.config.model_copy(update={"limits": runner.config.limits.model_copy(update={"max_video_bytes": 100_000})})
    tifffile.imwrite(runner.config.inbox / "big.tif", np.zeros((20, 100, 100), np.uint8))
    (runner.config.inbox / "big.yaml").write_text(yaml.safe_dump({"model": "sam2_t", "video": {"objects": {0: [{"obj_id": 1, "bbox": [1, 1, 9, 9]}]}}}))
    outcome = runner.run(JobTicket("big", "big.yaml", "big.tif", "s", "v"), Progress(JobOutputs(runner.config.outbox, "big"), threading.Event()))
    assert outcome.state == "failed" and outcome.error.code == "video_too_large"
    assert "max_video_bytes" in outcome.error.message


def test_an_oversized_image_is_refused_from_its_header(tmp_path: Path, vit_t_checkpoint: Path) -> None:
    runner = make_runner(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    runner.config = runner.config.model_copy(update={"limits": runner.config.limits.model_copy(update={"max_image_pixels": 10_000})})
    Image.fromarray(coins()).save(runner.config.inbox / "huge.png")
    (runner.config.inbox / "huge.yaml").write_text(yaml.safe_dump({"prompts": [{"bbox": [1, 1, 9, 9]}]}))
    outcome = runner.run(JobTicket("huge", "huge.yaml", "huge.png", "s", "v"), Progress(JobOutputs(runner.config.outbox, "huge"), threading.Event()))
    assert outcome.state == "failed" and outcome.error.code == "image_too_large"
    assert outcome.error.file == "huge.png"
    assert runner.pool.loaded() == []  # refused before any model was loaded
