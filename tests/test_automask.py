"""Automask (samapi's /sam/automask/) on MobileSAM (vit_t) and SAM2 (sam2_t) with random weights.

Random weights give arbitrary masks, so the quality filters are switched off (thresholds 0) and,
where counts are checked, NMS too (box_nms_thresh 1.0 keeps every box). Each family's adapter
encodes the image once per module; generators get that embedding, and stand-ins replace the
seconds-long encodings of crops and of a second image.

The output_type logic is shared by both families (a mixin), so its full matrix runs on vit_t;
sam2_t checks what is its own: multimask reaching its decoder and the small-region step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

from samwatch.errors import JobError
from samwatch.models import automask, sam1, sam2
from samwatch.models.base import Detection, RunContext
from samwatch.vocab import LoadSpec
from samwatch.sidecar import AutomaskParams, validate_sidecar

IMAGE = np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256×256 RGB
KEY = "astronaut"
NO_FILTERS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "include_image_edge": True}
KEEP_ALL = {**NO_FILTERS, "box_nms_thresh": 1.0}


@dataclass
class Family:
    """One model family: its adapter (image already encoded) and how automask reaches it."""

    model_type: str
    adapter: Any
    predictor_class: type  # whose set_image an encoding goes through

    def ctx(self, progress: list[float] | None = None, **params: Any) -> RunContext:
        sidecar = validate_sidecar({"model": self.model_type, "automask": params}, name="t")
        report = (lambda stage, fraction: progress.append(fraction)) if progress is not None else (lambda s, f: None)
        return RunContext(sidecar=sidecar, image=IMAGE, image_key=KEY, progress=report)

    def engine(self) -> Any:
        return self.adapter.predictor if self.model_type == "vit_t" else self.adapter.model

    def embedding(self) -> dict[str, Any]:
        return self.adapter._memo.capture(self.adapter.predictor)

    def build(self, ctx: RunContext, embedding: dict[str, Any] | None = None) -> Any:
        build = automask.build_sam1_generator if self.model_type == "vit_t" else automask.build_sam2_generator
        return build(self.engine(), ctx, embedding)

    def generate(self, ctx: RunContext, embedding: dict[str, Any] | None = None) -> list[Detection]:
        generate = automask.generate_sam1 if self.model_type == "vit_t" else automask.generate_sam2
        return generate(self.engine(), ctx, embedding=embedding)


@pytest.fixture(scope="module", params=["vit_t", "sam2_t"])
def family(request: pytest.FixtureRequest) -> Family:
    return request.getfixturevalue(f"{request.param}_family")


@pytest.fixture(scope="module")
def vit_t_family(vit_t_checkpoint: Path) -> Family:
    from mobile_sam import SamPredictor

    return _family("vit_t", sam1.Adapter(), vit_t_checkpoint, SamPredictor)


@pytest.fixture(scope="module")
def sam2_t_family(sam2_t_checkpoint: Path) -> Family:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    return _family("sam2_t", sam2.Adapter(), sam2_t_checkpoint, SAM2ImagePredictor)


def _family(model_type: str, adapter: Any, checkpoint: Path, predictor_class: type) -> Family:
    adapter.setup(LoadSpec(model_type=model_type, checkpoint=checkpoint, weights_name="t"), torch.device("cpu"))
    family = Family(model_type, adapter, predictor_class)
    adapter.set_image(family.ctx())
    return family


# ------------------------------------------------------------------------- parameters


def test_every_parameter_reaches_the_generator(family: Family) -> None:
    params = {
        "points_per_side": 6, "points_per_batch": 7, "pred_iou_thresh": 0.31, "stability_score_thresh": 0.42,
        "stability_score_offset": 0.53, "box_nms_thresh": 0.64, "crop_n_layers": 2, "crop_nms_thresh": 0.75,
        "crop_overlap_ratio": 0.2, "crop_n_points_downscale_factor": 2, "min_mask_region_area": 9,
        "output_type": "Multi-mask (smallest)", "include_image_edge": True,
    }
    assert set(params) == set(AutomaskParams.model_fields)  # a new field must be wired and tested
    generator = family.build(family.ctx(**params))
    for name, value in params.items():
        if name not in ("points_per_side", "output_type"):
            assert getattr(generator, name) == value, name
    assert [len(grid) for grid in generator.point_grids] == [36, 9, 1]  # 6², (6/2)², (6/4 → 1)²
    assert generator.choice == "smallest" and generator.multimask_output is True
    upstream = "mobile_sam" if family.model_type == "vit_t" else "sam2"
    assert any(base.__module__.startswith(upstream) for base in type(generator).__mro__)


def test_single_mask_turns_multimask_off(family: Family) -> None:
    generator = family.build(family.ctx(output_type="Single Mask"))
    assert generator.multimask_output is False and generator.choice == "single"


@pytest.mark.parametrize(
    "params",
    [{"points_per_side": None}, {"points_per_side": 3, "crop_n_layers": 2, "crop_n_points_downscale_factor": 2}],
)
def test_grids_without_points_are_refused(family: Family, params: dict[str, Any]) -> None:
    with pytest.raises(JobError) as caught:
        family.build(family.ctx(**params))
    assert caught.value.code == "sidecar_invalid" and caught.value.field == "automask.points_per_side"


# ------------------------------------------------------------------------- output types


@pytest.fixture(scope="module")
def every(vit_t_family: Family) -> tuple[list[Detection], list[float]]:
    """vit_t's "Multi-mask (all)" on a 2×2 grid in batches of 3 points, nothing filtered, and its progress."""
    progress: list[float] = []
    ctx = vit_t_family.ctx(progress, points_per_side=2, points_per_batch=3, output_type="Multi-mask (all)", **KEEP_ALL)
    return vit_t_family.generate(ctx, vit_t_family.embedding()), progress


def test_all_keeps_three_masks_per_point(every: tuple[list[Detection], list[float]]) -> None:
    found, progress = every
    assert progress == [0.5, 1.0]  # two batches: 3 points, then 1
    by_point = group_by_point(found)
    assert sorted(by_point) == [(64.0, 64.0), (64.0, 192.0), (192.0, 64.0), (192.0, 192.0)]
    assert all(len(masks) == 3 for masks in by_point.values())
    assert_detections(found)


@pytest.mark.parametrize(
    ("output_type", "choose"),
    [
        ("Multi-mask (largest)", lambda masks: max(masks, key=lambda d: d.mask.sum())),
        ("Multi-mask (smallest)", lambda masks: min(masks, key=lambda d: d.mask.sum())),
        ("Multi-mask (best quality)", lambda masks: max(masks, key=lambda d: d.score)),
    ],
)
def test_one_of_three_per_point(
    vit_t_family: Family, every: tuple[list[Detection], list[float]], output_type: str, choose: Any
) -> None:
    by_point = group_by_point(every[0])
    chosen = group_by_point(
        vit_t_family.generate(vit_t_family.ctx(points_per_side=2, output_type=output_type, **KEEP_ALL),
                              vit_t_family.embedding())
    )
    assert sorted(chosen) == sorted(by_point)
    for point, (detection,) in chosen.items():
        assert np.array_equal(detection.mask, choose(by_point[point]).mask), point


def test_single_mask_gives_one_per_point(vit_t_family: Family) -> None:
    single = vit_t_family.generate(vit_t_family.ctx(points_per_side=2, **KEEP_ALL), vit_t_family.embedding())
    assert [len(masks) for masks in group_by_point(single).values()] == [1, 1, 1, 1]
    assert_detections(single)


def test_sam2_multimask_reaches_its_decoder(sam2_t_family: Family) -> None:
    every = sam2_t_family.generate(
        sam2_t_family.ctx(points_per_side=1, output_type="Multi-mask (all)", **KEEP_ALL), sam2_t_family.embedding()
    )
    single = sam2_t_family.generate(sam2_t_family.ctx(points_per_side=1, **KEEP_ALL), sam2_t_family.embedding())
    assert len(every) == 3 and len(single) == 1
    assert_detections(every + single)
    (largest,) = sam2_t_family.generate(
        sam2_t_family.ctx(points_per_side=1, output_type="Multi-mask (largest)", **KEEP_ALL), sam2_t_family.embedding()
    )
    assert largest.mask.sum() == max(d.mask.sum() for d in every)


def test_nms_removes_duplicates_unless_all_are_kept(
    vit_t_family: Family, every: tuple[list[Detection], list[float]]
) -> None:
    # random weights give near-identical blobs from every point: NMS at 0.7 leaves few of them,
    # while "all" skips NMS, so the box_nms_thresh 1.0 of `every` made no difference there
    deduplicated = vit_t_family.generate(
        vit_t_family.ctx(points_per_side=2, **{**KEEP_ALL, "box_nms_thresh": 0.7}), vit_t_family.embedding()
    )
    assert len(every[0]) == 12 and len(deduplicated) < 4


# ------------------------------------------------------------------------- image edge


def test_near_edge_rule(vit_t_family: Family) -> None:
    """The fork's is_box_near_crop_edge(ignore_image_edge=include_image_edge), boxes in crop frame."""
    boxes = torch.tensor([
        [0, 0, 255, 255],  # spans the whole 256×256 image
        [5, 5, 250, 120],  # touches three image borders only
        [100, 100, 127, 120],  # ends at the inner edge of the crop [0, 0, 128, 128]
        [40, 40, 60, 60],  # inside
    ])
    excluded = vit_t_family.build(vit_t_family.ctx(include_image_edge=False))
    included = vit_t_family.build(vit_t_family.ctx(include_image_edge=True))
    whole, quarter = [0, 0, 256, 256], [0, 0, 128, 128]
    assert excluded._near_edge(boxes, whole, (256, 256)).tolist() == [True, False, False, False]
    assert included._near_edge(boxes, whole, (256, 256)).tolist() == [False, False, False, False]
    assert included._near_edge(boxes[2:], quarter, (256, 256)).tolist() == [True, False]


def test_include_image_edge_keeps_whole_image_masks(
    vit_t_family: Family, every: tuple[list[Detection], list[float]]
) -> None:
    included = every[0]
    excluded = vit_t_family.generate(
        vit_t_family.ctx(points_per_side=2, output_type="Multi-mask (all)", **{**KEEP_ALL, "include_image_edge": False}),
        vit_t_family.embedding(),
    )
    assert any(spans_image(d.mask) for d in included), "random weights should give some whole-image blobs"
    assert [d.mask.tobytes() for d in excluded] == [d.mask.tobytes() for d in included if not spans_image(d.mask)]


# ------------------------------------------------------------------------- crops, encoding


def test_crop_layers(vit_t_family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = fake_encodings(monkeypatch, vit_t_family)
    # random blobs fill each crop and would all be dropped as cut by a crop border; let them
    # through so that their way back into image coordinates can be checked
    monkeypatch.setattr(vit_t_family.build(vit_t_family.ctx()).amg, "is_box_near_crop_edge",
                        lambda boxes, *args: torch.zeros(len(boxes), dtype=torch.bool))
    progress: list[float] = []
    found = vit_t_family.generate(
        vit_t_family.ctx(progress, points_per_side=2, crop_n_layers=1, crop_n_points_downscale_factor=2,
                         crop_nms_thresh=1.0, **KEEP_ALL),
        vit_t_family.embedding(),
    )
    crops = [[0, 0, 172, 172], [0, 85, 172, 256], [85, 0, 256, 172], [85, 85, 256, 256]]  # overlap 87 px
    assert sorted(encoded) == sorted((y1 - y0, x1 - x0) for x0, y0, x1, y1 in crops)  # not the whole image
    assert progress == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 1 batch for the image, 1 per crop
    in_crops = [d for d in found if d.extra["crop_box"] != [0, 0, 256, 256]]
    assert sorted(d.extra["crop_box"] for d in in_crops) == sorted(crops)  # one point each
    for detection in in_crops:
        x0, y0, x1, y1 = detection.extra["crop_box"]
        assert detection.extra["point_coords"] == [(x0 + x1) / 2, (y0 + y1) / 2]  # the crop's 1×1 grid
        outside = detection.mask.copy()
        outside[y0:y1, x0:x1] = False
        assert detection.mask[y0:y1, x0:x1].any() and not outside.any()


def test_generate_without_embedding_encodes_the_image_once(
    vit_t_family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded = fake_encodings(monkeypatch, vit_t_family)
    vit_t_family.generate(vit_t_family.ctx(points_per_side=1, **NO_FILTERS))
    assert encoded == [IMAGE.shape[:2]]
    vit_t_family.generate(vit_t_family.ctx(points_per_side=1, **NO_FILTERS), vit_t_family.embedding())
    assert encoded == [IMAGE.shape[:2]]


def test_adapters_run_automask(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Adapter.run: both families hand their cached embedding over, nothing is re-encoded."""
    encoded = fake_encodings(monkeypatch, family)
    progress: list[float] = []
    found = family.adapter.run(family.ctx(progress, points_per_side=1, **NO_FILTERS))
    assert encoded == []
    assert progress[-1] == 1.0 and len(found) == 1
    assert_detections(found)


def test_sam2_small_region_postprocessing(sam2_t_family: Family) -> None:
    area = IMAGE.shape[0] * IMAGE.shape[1]  # every hole and every island but the largest goes
    (raw,) = sam2_t_family.generate(sam2_t_family.ctx(points_per_side=1, **NO_FILTERS), sam2_t_family.embedding())
    (cleaned,) = sam2_t_family.generate(
        sam2_t_family.ctx(points_per_side=1, min_mask_region_area=area, **NO_FILTERS), sam2_t_family.embedding()
    )
    assert ndimage.label(cleaned.mask)[1] == 1
    assert np.array_equal(ndimage.binary_fill_holes(cleaned.mask), cleaned.mask)
    assert not np.array_equal(raw.mask, cleaned.mask)


# ------------------------------------------------------------------------- helpers


def assert_detections(detections: list[Detection]) -> None:
    for detection in detections:
        assert detection.mask.dtype == bool and detection.mask.shape == IMAGE.shape[:2]
        assert isinstance(detection.score, float)
        assert isinstance(detection.extra["stability_score"], float)
        assert 0.0 <= detection.extra["stability_score"] <= 1.0
        assert detection.prompt_idx is None and detection.label is None
        assert len(detection.extra["point_coords"]) == 2 and len(detection.extra["crop_box"]) == 4


def group_by_point(detections: list[Detection]) -> dict[tuple[float, float], list[Detection]]:
    groups: dict[tuple[float, float], list[Detection]] = defaultdict(list)
    for detection in detections:
        groups[tuple(detection.extra["point_coords"])].append(detection)
    return dict(groups)


def spans_image(mask: np.ndarray, tolerance: int = 20) -> bool:
    if not mask.any():
        return False
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    height, width = mask.shape
    return bool(rows[0] <= tolerance and cols[0] <= tolerance
                and rows[-1] >= height - tolerance and cols[-1] >= width - tolerance)


def fake_encodings(monkeypatch: pytest.MonkeyPatch, family: Family) -> list[tuple[int, ...]]:
    """Replace the family's encoder: record the size of each image encoded and set the cached
    embedding of the test image with that image's geometry (decoding still runs for real)."""
    encoded: list[tuple[int, ...]] = []
    embedding = family.embedding()

    def encode(predictor: Any, image: np.ndarray) -> None:
        height, width = image.shape[:2]
        encoded.append((height, width))
        for name, value in embedding.items():
            setattr(predictor, name, value)
        if family.model_type == "vit_t":
            predictor.original_size = (height, width)
            predictor.input_size = predictor.transform.get_preprocess_shape(height, width, 1024)
            predictor.is_image_set = True
        else:
            predictor._orig_hw = [(height, width)]
            predictor._is_image_set = True

    monkeypatch.setattr(family.predictor_class, "set_image", encode)
    return encoded
