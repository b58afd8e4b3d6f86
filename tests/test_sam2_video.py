"""SAM2 video tracking against sam2's own SAM2VideoPredictor, on a real (panned) image sequence.

Both sides load the same random-weight hiera_t checkpoint. Frames are written as JPEG once and
the stand-in Media reads those JPEGs back, so samwatch and the direct predictor (which reads the
folder itself) see identical pixels. The model runs at image_size 256 instead of 1024 to keep the
CPU time small; samwatch mirrors the loaded model's image size, so nothing else changes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from samwatch.errors import JobCancelled, JobError
from samwatch.models.base import Detection, RunContext
from samwatch.models.sam2_video import memory_reach, new_inference_state, track, video_predictor
from samwatch.sidecars.schema import Sidecar
from tests.conftest import SAM2_TINY_CONFIG

IMAGE_SIZE = 256
N_FRAMES = 6
SIZE_OVERRIDE = [f"++model.image_size={IMAGE_SIZE}"]
# object 1 is prompted again on frame 4 (a second conditioning frame)
OBJECTS = {
    0: [
        {"obj_id": 1, "bbox": [40, 30, 90, 80]},
        {"obj_id": 2, "points": [[120, 60], [20, 100]], "point_labels": [1, 0]},
    ],
    4: [{"obj_id": 1, "bbox": [30, 30, 80, 80], "points": [[55, 55]]}],
}
# first prompted after the start frame: sam2 1.1 alone crashes on it (dtype mismatch)
LATE_OBJECT = {2: [{"obj_id": 3, "bbox": [60, 70, 110, 120], "points": [[85, 95]]}]}


class JpegMedia:
    """The duck type of samwatch.media.read.Media over a folder of JPEG frames; counts reads."""

    def __init__(self, folder: Path) -> None:
        self.paths = sorted(folder.glob("*.jpg"), key=lambda path: int(path.stem))
        self.n_frames = len(self.paths)
        self.width, self.height = Image.open(self.paths[0]).size
        self.reads: list[int] = []

    def frame(self, index: int) -> np.ndarray:
        self.reads.append(index)
        return np.array(Image.open(self.paths[index]).convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core runner, two threads spin against other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128×160 window panning 4 px per frame across skimage's coins."""
    folder = tmp_path_factory.mktemp("frames")
    coins = data.coins()
    for index in range(N_FRAMES):
        crop = coins[40:168, 30 + 4 * index : 190 + 4 * index]
        Image.fromarray(crop).convert("RGB").save(folder / f"{index}.jpg")
    return folder


@pytest.fixture(scope="module")
def adapter(sam2_t_checkpoint: Path) -> SimpleNamespace:
    """What samwatch.models.sam2.Adapter offers the video path: model, device, config_used."""
    from sam2.build_sam import build_sam2

    model = build_sam2(SAM2_TINY_CONFIG, None, device="cpu", hydra_overrides_extra=SIZE_OVERRIDE)
    model.load_state_dict(torch.load(sam2_t_checkpoint, weights_only=True)["model"])
    return SimpleNamespace(model=model, device=torch.device("cpu"), config_used=SAM2_TINY_CONFIG)


@pytest.fixture(scope="module")
def direct(sam2_t_checkpoint: Path) -> Any:
    from sam2.build_sam import build_sam2_video_predictor

    return build_sam2_video_predictor(
        SAM2_TINY_CONFIG, str(sam2_t_checkpoint), device="cpu", hydra_overrides_extra=SIZE_OVERRIDE
    )


@pytest.fixture(scope="module")
def direct_forward(direct, frames_dir) -> dict[tuple[int, int], tuple[np.ndarray, float]]:
    return run_direct(direct, frames_dir)


def make_ctx(media: JpegMedia, progress: Any = None, objects: dict = OBJECTS, **video: Any) -> RunContext:
    sidecar = Sidecar.model_validate({"model": "sam2_t", "video": {"objects": objects, **video}})
    ctx = RunContext(sidecar=sidecar, image=None, image_key="", frames=media)
    if progress is not None:
        ctx.progress = progress
    return ctx


def run_direct(predictor: Any, folder: Path, start: int | None = None, limit: int | None = None,
               reverse: bool = False) -> dict[tuple[int, int], tuple[np.ndarray, float]]:
    """samapi's get_video_segments (plus a reverse pass, forward results first), by the book."""
    state = predictor.init_state(video_path=str(folder))
    for frame_idx, objects in OBJECTS.items():
        for obj in objects:
            points = obj.get("points")
            labels = obj.get("point_labels", [1] * len(points)) if points else None
            predictor.add_new_points_or_box(state, frame_idx, obj["obj_id"], points=points,
                                            labels=labels, box=obj.get("bbox"))
    results: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    for backwards in [False, True] if reverse else [False]:
        for frame_idx, obj_ids, logits in predictor.propagate_in_video(
            state, start_frame_idx=start, max_frame_num_to_track=limit, reverse=backwards
        ):
            for obj_idx, obj_id in enumerate(obj_ids):
                outputs = state["output_dict_per_obj"][obj_idx]
                out = outputs["cond_frame_outputs"].get(frame_idx, outputs["non_cond_frame_outputs"].get(frame_idx))
                mask = (logits[obj_idx, 0] > 0).numpy()
                if mask.any():
                    score = float(torch.sigmoid(out["object_score_logits"]))
                    results.setdefault((frame_idx, obj_id), (mask, score))
    return results


def by_key(detections: list[Detection]) -> dict[tuple[int, int], Detection]:
    keyed = {(d.frame, d.obj_id): d for d in detections}
    assert len(keyed) == len(detections), "one detection per object per frame"
    return keyed


def assert_same_as_direct(detections: list[Detection], expected: dict) -> None:
    got = by_key(detections)
    assert set(got) == set(expected)
    for key, (mask, score) in expected.items():
        ours = got[key]
        assert ours.mask.dtype == bool and ours.mask.shape == mask.shape
        iou = np.logical_and(ours.mask, mask).sum() / np.logical_or(ours.mask, mask).sum()
        assert iou >= 0.99, f"frame {key[0]} object {key[1]}: IoU {iou:.4f}"
        assert ours.score == pytest.approx(score, abs=1e-5)
        assert ours.prompt_idx is None


def test_matches_direct_predictor(adapter, direct_forward, frames_dir) -> None:
    media = JpegMedia(frames_dir)
    detections = track(adapter, make_ctx(media))
    assert_same_as_direct(detections, direct_forward)
    # every object on every frame from the earliest prompted frame (0) to the end
    assert set(by_key(detections)) == {(f, o) for f in range(N_FRAMES) for o in (1, 2)}
    assert [d.frame for d in detections] == sorted(d.frame for d in detections)
    assert sorted(media.reads) == sorted([*range(N_FRAMES), 4]), "frames are decoded once, on demand"


def test_object_prompted_after_the_start_frame_is_tracked_from_it(adapter, direct_forward, frames_dir) -> None:
    detections = track(adapter, make_ctx(JpegMedia(frames_dir), objects={**OBJECTS, **LATE_OBJECT}))
    assert {frame for frame, obj_id in by_key(detections) if obj_id == 3} == set(range(N_FRAMES))
    # sam2 tracks each object on its own, so the others are exactly what sam2 gives without it
    assert_same_as_direct([d for d in detections if d.obj_id != 3], direct_forward)


def test_state_and_pixels_match_sam2_init_state(adapter, direct, frames_dir) -> None:
    predictor = video_predictor(adapter)
    ours = new_inference_state(predictor, JpegMedia(frames_dir))
    theirs = direct.init_state(video_path=str(frames_dir))
    assert set(ours) == set(theirs)
    assert (ours["video_height"], ours["video_width"]) == (theirs["video_height"], theirs["video_width"])
    for index in (0, N_FRAMES - 1):
        assert torch.equal(ours["images"][index], theirs["images"][index])


def test_predictor_shares_the_adapters_weights_and_is_cached(adapter) -> None:
    predictor = video_predictor(adapter)
    assert video_predictor(adapter) is predictor
    assert predictor.image_size == adapter.model.image_size == IMAGE_SIZE
    shared = {id(param) for param in adapter.model.parameters()}
    assert {id(param) for param in predictor.parameters()} == shared


def test_reverse_and_bounded_memory_match_direct(adapter, direct, frames_dir, monkeypatch) -> None:
    """With a reach of one frame, dropping old memories must not change a single result."""
    predictor = video_predictor(adapter)
    for model in (predictor, direct):
        monkeypatch.setattr(model, "num_maskmem", 2)
        monkeypatch.setattr(model, "max_obj_ptrs_in_encoder", 2)
    assert memory_reach(predictor) == 1
    kept: list[int] = []
    propagate_in_video = predictor.propagate_in_video

    def spy(state: dict, **kwargs: Any):
        for item in propagate_in_video(state, **kwargs):
            kept.append(len(state["output_dict_per_obj"][1]["non_cond_frame_outputs"]))
            yield item

    monkeypatch.setattr(predictor, "propagate_in_video", spy)
    start = 2
    detections = track(adapter, make_ctx(JpegMedia(frames_dir), start_frame_idx=start, reverse=True))
    assert_same_as_direct(detections, run_direct(direct, frames_dir, start=start, reverse=True))
    assert {frame for frame, _ in by_key(detections)} == set(range(N_FRAMES))
    # forward 2..5, then reverse 2..0: unpruned, object 2 ends up holding all 6 frames' outputs
    assert len(kept) == (N_FRAMES - start) + (start + 1)
    assert max(kept) <= 2 * (memory_reach(predictor) + 1) < N_FRAMES


def test_start_and_max_frames_stream_only_what_is_tracked(adapter, frames_dir) -> None:
    media = JpegMedia(frames_dir)
    calls: list[tuple[str, float]] = []
    ctx = make_ctx(media, lambda stage, fraction: calls.append((stage, fraction)),
                   start_frame_idx=2, max_frame_num_to_track=2)
    detections = track(adapter, ctx)
    # sam2 (and so samapi) tracks the start frame plus max_frame_num_to_track frames, forward only
    assert set(by_key(detections)) == {(f, o) for f in (2, 3, 4) for o in (1, 2)}
    assert set(media.reads) == {0, 2, 3, 4}, "prompted frames and tracked frames only"
    assert calls == [("tracking", 1 / 3), ("tracking", 2 / 3), ("tracking", 1.0)]


def test_cancel_stops_tracking_and_releases_the_state(adapter, frames_dir) -> None:
    media = JpegMedia(frames_dir)
    calls: list[float] = []

    def progress(stage: str, fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == 2:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        track(adapter, make_ctx(media, progress))
    assert calls == [1 / N_FRAMES, 2 / N_FRAMES]
    assert set(media.reads) == {0, 1, 4}, "no frame after the cancelled one is read"


@pytest.mark.parametrize(
    ("video", "field"),
    [
        ({"objects": {N_FRAMES: [{"obj_id": 1, "bbox": [0, 0, 5, 5]}]}}, f"video.objects.{N_FRAMES}"),
        ({"objects": {0: [{"obj_id": 1, "points": [[1, 1]]}, {"obj_id": 2, "bbox": [0, 0, 161, 5]}]}},
         "video.objects.0.1.bbox"),
        ({"objects": {1: [{"obj_id": 1, "points": [[5, 5], [3, 129]]}]}}, "video.objects.1.0.points.1"),
        ({"objects": {0: [{"obj_id": 1, "bbox": [0, 0, 5, 5]}]}, "start_frame_idx": N_FRAMES},
         "video.start_frame_idx"),
    ],
)
def test_prompt_out_of_bounds(adapter, frames_dir, video: dict, field: str) -> None:
    ctx = RunContext(sidecar=Sidecar.model_validate({"video": video}), image=None, image_key="",
                     frames=JpegMedia(frames_dir))
    with pytest.raises(JobError) as caught:
        track(adapter, ctx)
    assert (caught.value.code, caught.value.field) == ("prompt_out_of_bounds", field)


def test_a_video_job_needs_an_object(adapter, frames_dir) -> None:
    ctx = RunContext(sidecar=Sidecar.model_validate({"video": {"objects": {0: []}}}), image=None,
                     image_key="", frames=JpegMedia(frames_dir))
    with pytest.raises(JobError) as caught:
        track(adapter, ctx)
    assert (caught.value.code, caught.value.field) == ("sidecar_invalid", "video.objects")


@pytest.mark.parametrize("obj", [{"obj_id": 1, "text": "coin"}, {"obj_id": 1, "boxes_xywh": [[0, 0, 5, 5]]}])
def test_sam3_prompts_are_refused(adapter, frames_dir, obj: dict) -> None:
    ctx = RunContext(sidecar=Sidecar.model_validate({"video": {"objects": {0: [obj]}}}), image=None,
                     image_key="", frames=JpegMedia(frames_dir))
    with pytest.raises(JobError) as caught:
        track(adapter, ctx)
    assert (caught.value.code, caught.value.field) == ("sidecar_invalid", "video.objects.0.0")
    assert "sam3" in caught.value.message
