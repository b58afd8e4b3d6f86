"""samapi's ``/sam/automask/``: a grid of point prompts over the image, filtered and de-duplicated.

samapi serves vit_* through its MobileSAM fork (github.com/ksugar/MobileSAM), whose
``SamAutomaticMaskGenerator`` adds ``output_type`` and ``include_image_edge``, and sam2_* through
sam2's stock ``SAM2AutomaticMaskGenerator``, which knows neither (it only turns multimask on for
"Multi" types). samwatch subclasses each family's upstream generator (vit_t: mobile_sam's,
vit_h/l/b: segment_anything's, sam2_*: sam2's) and gives every field one meaning for all of them:

``output_type``
    ``Single Mask``: one mask per grid point. ``Multi-mask`` / ``Multi-mask (all)``: the three
    masks of every point, all kept: no de-duplication within a crop (as the fork does).
    ``Multi-mask (largest|smallest|best quality)``: of a point's three masks that pass the
    quality filters, the one with the most / fewest pixels / the highest predicted IoU; one per
    point, before de-duplication (the fork only prefers such masks in the NMS, which can keep
    several masks of one point; its documented meaning is "one of the three is kept").
    De-duplication (box NMS at ``box_nms_thresh``) prefers what the fork prefers: larger masks
    for ``largest``, smaller ones for ``smallest`` and ``Single Mask``, higher predicted IoU for
    ``best quality``.
``include_image_edge``
    The fork's meaning: False (samapi's default) also drops masks whose bounding box comes within
    20 px (upstream's crop-edge tolerance) of all four image borders, i.e. masks spanning the
    whole image, typically the background; True keeps them, as upstream does. Masks cut by the
    border of an inner crop are dropped either way. The point grid is upstream's in both cases.
``min_mask_region_area``
    SAM1's full-resolution post-processing (holes and islands smaller than this are removed,
    then NMS again) for both families. sam2's generator instead fills holes in the low-resolution
    logits with a CUDA-only kernel that is skipped, with a warning, without it.

Every other field goes to the upstream constructor unchanged. Progress is reported after each
point batch, and the whole-image crop reuses an embedding the adapter already holds.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from samwatch.errors import JobError
from samwatch.models.base import Detection, ProgressFn, RunContext
from samwatch.sidecars.schema import AutomaskParams, MaskChoice

Embedding = Mapping[str, Any]
"""Predictor attributes that hold one image's embedding, as the adapters cache them."""

#: AutomaskParams fields the upstream generators lack: implemented here, not passed on.
_SAMAPI_ONLY = frozenset({"output_type", "include_image_edge"})
_ONE_PER_POINT = frozenset({"largest", "smallest", "best"})
_EDGE_TOLERANCE = 20.0  # pixels: upstream's is_box_near_crop_edge atol, which the fork reuses


class _SamapiGenerator:
    """Mixed in before an upstream generator: owns the crop, batch and per-point steps.

    Upstream's constructor (fields, point grids), ``generate`` (records, SAM1's small-region
    post-processing) and ``postprocess_small_regions`` are kept. ``_generate_masks``,
    ``_process_crop`` and ``_process_batch`` are replaced: upstream hard-codes what samapi's
    fields change (multimask on, NMS by predicted IoU, the edge test), encodes every crop, and
    reports no progress. Cross-crop NMS is upstream's rule unchanged.
    """

    amg: Any  # the upstream package's utils.amg module
    image_set_flag: str  # the predictor attribute that says an image is set
    predictor: Any
    point_grids: list[np.ndarray]
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    crop_n_layers: int
    crop_nms_thresh: float
    crop_overlap_ratio: float
    mask_threshold: float
    min_mask_region_area: int
    postprocess_small_regions: Callable[[Any, int, float], Any]

    def __init__(
        self,
        engine: Any,
        params: AutomaskParams,
        choice: MaskChoice,
        progress: ProgressFn,
        embedding: Embedding | None,
    ) -> None:
        super().__init__(engine, **params.model_dump(exclude=_SAMAPI_ONLY))  # type: ignore[call-arg]
        self.choice = choice
        self.multimask_output = choice != "single"
        self.include_image_edge = params.include_image_edge
        self.progress = progress
        self.embedding = embedding
        self.batches_done = 0
        self.batches_total = 1

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (points × masks × H × W of the crop) and predicted IoUs, one point each."""
        raise NotImplementedError

    def _generate_masks(self, image: np.ndarray) -> Any:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = self.amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        self.batches_done = 0
        self.batches_total = sum(
            math.ceil(len(self.point_grids[layer]) / self.points_per_batch) for layer in layer_idxs
        )
        data = _joined(self.amg, [
            self._process_crop(image, crop_box, layer_idx, orig_size)
            for crop_box, layer_idx in zip(crop_boxes, layer_idxs)
        ])
        if len(crop_boxes) > 1:  # duplicates between crops: upstream prefers masks from smaller crops
            boxes = data["boxes"].float()
            scores = 1 / box_area(data["crop_boxes"]).to(boxes.device)
            data.filter(batched_nms(boxes, scores, torch.zeros_like(boxes[:, 0]), iou_threshold=self.crop_nms_thresh))
        data.to_numpy()
        return data

    def _encode(self, image: np.ndarray, whole_image: bool) -> None:
        if whole_image and self.embedding is not None:
            for name, value in self.embedding.items():
                setattr(self.predictor, name, value)
            setattr(self.predictor, self.image_set_flag, True)
        else:
            self.predictor.set_image(image)

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int, orig_size: tuple[int, ...]
    ) -> Any:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self._encode(crop, whole_image=crop_layer_idx == 0)
        points_for_crop = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]
        batches = []
        for (points,) in self.amg.batch_iterator(self.points_per_batch, points_for_crop):
            batches.append(self._process_batch(points, crop_size, crop_box, orig_size))
            self.batches_done += 1
            self.progress("automask", self.batches_done / self.batches_total)
        data = _joined(self.amg, batches)
        if self.choice != "all":
            boxes = data["boxes"].float()
            keep = batched_nms(
                boxes, self._nms_priority(data).to(boxes.device), torch.zeros_like(boxes[:, 0]),
                iou_threshold=self.box_nms_thresh,
            )
            data.filter(keep)
        data["boxes"] = self.amg.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = self.amg.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.as_tensor(crop_box).repeat(len(data["rles"]), 1)
        return data

    def _nms_priority(self, data: Any) -> torch.Tensor:
        if self.choice == "best":
            return data["iou_preds"].float()
        areas = torch.tensor([self.amg.area_from_rle(rle) for rle in data["rles"]], dtype=torch.float)
        return areas if self.choice == "largest" else -areas

    def _process_batch(
        self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...]
    ) -> Any:
        amg = self.amg
        masks, iou_preds = self._predict_points(points, im_size)
        per_point = masks.shape[1]
        data = amg.MaskData(
            masks=masks.flatten(0, 1),
            iou_preds=iou_preds.flatten(0, 1),
            points=torch.as_tensor(np.repeat(points, per_point, axis=0)),
            point_idx=torch.arange(len(points)).repeat_interleave(per_point),
        )
        del masks
        if self.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > self.pred_iou_thresh)
        data["stability_score"] = amg.calculate_stability_score(
            data["masks"], self.mask_threshold, self.stability_score_offset
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data["masks"] = data["masks"] > self.mask_threshold
        data["boxes"] = amg.batched_mask_to_box(data["masks"])
        data.filter(~self._near_edge(data["boxes"], crop_box, orig_size))
        if self.choice in _ONE_PER_POINT:
            data.filter(self._one_per_point(data))
        del data["point_idx"]
        data["masks"] = amg.uncrop_masks(data["masks"], crop_box, *orig_size)
        data["rles"] = amg.mask_to_rle_pytorch(data["masks"])
        del data["masks"]
        return data

    def _near_edge(self, boxes: torch.Tensor, crop_box: list[int], orig_size: tuple[int, ...]) -> torch.Tensor:
        """The fork's ``is_box_near_crop_edge(..., ignore_image_edge=include_image_edge)``."""
        height, width = orig_size
        near_crop_edge = self.amg.is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        if self.include_image_edge:
            return near_crop_edge
        image_box = torch.tensor([0, 0, width, height], dtype=torch.float, device=boxes.device)
        in_image = self.amg.uncrop_boxes_xyxy(boxes, crop_box).float()
        spans_image = torch.isclose(in_image, image_box, atol=_EDGE_TOLERANCE, rtol=0).all(dim=1)
        return near_crop_edge | spans_image

    def _one_per_point(self, data: Any) -> torch.Tensor:
        """Row indices of each point's largest / smallest / best-quality surviving mask."""
        if self.choice == "best":
            key = data["iou_preds"].float().cpu()
        else:
            key = data["masks"].flatten(1).sum(1).float().cpu()
            key = key if self.choice == "largest" else -key
        order = torch.argsort(key, descending=True, stable=True)
        _, first = np.unique(data["point_idx"][order].numpy(), return_index=True)
        return order[torch.as_tensor(first, dtype=torch.long)]


class _Sam1Hooks(_SamapiGenerator):
    image_set_flag = "is_image_set"

    @property
    def mask_threshold(self) -> float:  # type: ignore[override]
        return self.predictor.model.mask_threshold

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self.predictor
        coords = torch.as_tensor(predictor.transform.apply_coords(points, im_size), device=predictor.device)
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        masks, iou_preds, _ = predictor.predict_torch(
            coords[:, None, :], labels[:, None], multimask_output=self.multimask_output, return_logits=True
        )
        return masks, iou_preds


class _Sam2Hooks(_SamapiGenerator):
    image_set_flag = "_is_image_set"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # upstream hands min_mask_region_area to the predictor's low-res hole filling (CUDA-only);
        # a plain predictor leaves it to the full-resolution post-processing in _generate_masks
        self.predictor = type(self.predictor)(self.predictor.model)

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        predictor = self.predictor
        coords = predictor._transforms.transform_coords(
            torch.as_tensor(points, dtype=torch.float32, device=predictor.device), normalize=True, orig_hw=im_size
        )
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        masks, iou_preds, _ = predictor._predict(
            coords[:, None, :], labels[:, None], multimask_output=self.multimask_output, return_logits=True
        )
        return masks, iou_preds

    def _generate_masks(self, image: np.ndarray) -> Any:
        data = super()._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return data


def _joined(amg: Any, parts: list[Any]) -> Any:
    """One MaskData of several. MaskData.cat deep-copies every RLE it appends, which costs more
    than decoding when masks are ragged; these parts are fresh and ours alone."""
    joined = amg.MaskData()
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        joined[key] = torch.cat(values) if isinstance(first, torch.Tensor) else [item for value in values for item in value]
    return joined


@cache
def _generator_class(hooks: type, module_name: str, class_name: str) -> type:
    """``hooks`` over the upstream generator ``module_name.class_name``, with its package's amg."""
    base = getattr(importlib.import_module(module_name), class_name)
    amg = importlib.import_module(f"{module_name.split('.')[0]}.utils.amg")
    return type(f"Samwatch{class_name}", (hooks, base), {"amg": amg})


def _params(ctx: RunContext) -> AutomaskParams:
    params = ctx.sidecar.automask or AutomaskParams()
    if params.points_per_side is None:
        raise JobError(
            "sidecar_invalid",
            "automask.points_per_side must be a number: samwatch samples a regular grid of "
            "points_per_side² points (explicit point grids are not supported).",
            field="automask.points_per_side",
        )
    deepest = params.points_per_side / params.crop_n_points_downscale_factor**params.crop_n_layers
    if int(deepest) < 1:  # upstream divides by zero building an empty grid
        raise JobError(
            "sidecar_invalid",
            f"automask: the deepest crop layer would get no points (points_per_side {params.points_per_side} "
            f"/ crop_n_points_downscale_factor {params.crop_n_points_downscale_factor} ^ crop_n_layers "
            f"{params.crop_n_layers} < 1); raise points_per_side or lower the other two.",
            field="automask.points_per_side",
        )
    return params


def build_sam1_generator(predictor: Any, ctx: RunContext, embedding: Embedding | None = None) -> Any:
    """The generator of the package the predictor's model comes from (mobile_sam or segment_anything)."""
    package = type(predictor.model).__module__.split(".")[0]
    cls = _generator_class(_Sam1Hooks, package, "SamAutomaticMaskGenerator")
    return cls(predictor.model, _params(ctx), ctx.sidecar.mask_choice, ctx.progress, embedding)


def build_sam2_generator(sam2_model: Any, ctx: RunContext, embedding: Embedding | None = None) -> Any:
    cls = _generator_class(_Sam2Hooks, "sam2.automatic_mask_generator", "SAM2AutomaticMaskGenerator")
    return cls(sam2_model, _params(ctx), ctx.sidecar.mask_choice, ctx.progress, embedding)


def generate_sam1(predictor: Any, ctx: RunContext, *, embedding: Embedding | None = None) -> list[Detection]:
    """Automask with a ``SamPredictor``'s model; ``embedding``: the predictor's ``features``,
    ``original_size`` and ``input_size`` for ``ctx.image`` (then the whole image is not encoded
    again). The generator works on a predictor of its own: the adapter's is left as it was."""
    return _detections(build_sam1_generator(predictor, ctx, embedding), ctx.image)


def generate_sam2(sam2_model: Any, ctx: RunContext, *, embedding: Embedding | None = None) -> list[Detection]:
    """Automask with a SAM2 model; ``embedding``: a ``SAM2ImagePredictor``'s ``_features`` and
    ``_orig_hw`` for ``ctx.image`` (then the whole image is not encoded again)."""
    return _detections(build_sam2_generator(sam2_model, ctx, embedding), ctx.image)


def _detections(generator: Any, image: np.ndarray) -> list[Detection]:
    detections = []
    for record in generator.generate(image):
        x, y, w, h = (int(v) for v in record["crop_box"])  # upstream records give XYWH
        detections.append(
            Detection(
                mask=np.asarray(record["segmentation"], dtype=bool),
                score=float(record["predicted_iou"]),
                extra={
                    "stability_score": float(record["stability_score"]),
                    "point_coords": [float(v) for v in record["point_coords"][0]],
                    "crop_box": [x, y, x + w, y + h],
                },
            )
        )
    return detections
