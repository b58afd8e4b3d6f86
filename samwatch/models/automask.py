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

Memory is bounded by design, not by the image (upstream holds every batch's masks as float32 at
the crop's size, then all kept masks at the image's size at once): each mask's low-res logits are
brought to image pixels within its own box only (models/mask_windows.py, the same pixels), the
masks kept between steps are bit-packed crops, the small-region step decodes one mask at a time,
and detections are handed on one by one, cropped. Point batches shrink to fit
``limits.max_job_memory`` (models/budget.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from samwatch.errors import JobError
from samwatch.models.base import Detection, ProgressFn, RunContext
from samwatch.models.budget import automask_batch
from samwatch.models.mask_windows import MaskUpsampler, Resize, WindowMask
from samwatch.sidecars.schema import AutomaskParams, MaskChoice

Embedding = Mapping[str, Any]
"""Predictor attributes that hold one image's embedding, as the adapters cache them."""

#: AutomaskParams fields the upstream generators lack: implemented here, not passed on.
_SAMAPI_ONLY = frozenset({"output_type", "include_image_edge"})
_ONE_PER_POINT = frozenset({"largest", "smallest", "best"})
_EDGE_TOLERANCE = 20.0  # pixels: upstream's is_box_near_crop_edge atol, which the fork reuses


class _SamapiGenerator:
    """Mixed in before an upstream generator: owns the crop, batch and per-point steps.

    Upstream's constructor (fields, point grids) is kept, and its rules: the quality filters,
    box NMS within and across crops, the small-region step. ``generate`` and the steps below it
    are replaced: upstream hard-codes what samapi's fields change (multimask on, NMS by predicted
    IoU, the edge test), encodes every crop, reports no progress, and holds masks at full size.
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

    def __init__(
        self,
        engine: Any,
        params: AutomaskParams,
        choice: MaskChoice,
        progress: ProgressFn,
        embedding: Embedding | None,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__(engine, **params.model_dump(exclude=_SAMAPI_ONLY))  # type: ignore[call-arg]
        self.choice = choice
        self.multimask_output = choice != "single"
        self.include_image_edge = params.include_image_edge
        self.progress = progress
        self.embedding = embedding
        self.memory_budget = memory_budget
        self.batches_done = 0
        self.batches_total = 1

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (points × masks × 256 × 256) and predicted IoUs, one point each."""
        raise NotImplementedError

    def _resizes(self, im_size: tuple[int, ...]) -> tuple[list[Resize], list[Resize]]:
        """How the family's postprocessing brings low-res logits to a crop's pixels, per axis."""
        raise NotImplementedError

    @torch.inference_mode()
    def detections(self, image: np.ndarray) -> Iterator[Detection]:
        """Every mask found, as upstream's ``generate`` finds them; each cropped to its box and
        made only when it is handed on."""
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self._small_regions(data, image.shape[:2], max(self.box_nms_thresh, self.crop_nms_thresh))
        return self._handed_on(data)

    def _handed_on(self, data: Any) -> Iterator[Detection]:
        for index, window in enumerate(data["windows"]):
            x0, y0 = (int(v) for v in data["boxes"][index][:2])
            yield Detection(
                mask=window.pixels(), score=float(data["iou_preds"][index]), origin=(x0, y0),
                extra={
                    "stability_score": float(data["stability_score"][index]),
                    "point_coords": [float(v) for v in data["points"][index]],
                    "crop_box": [int(v) for v in data["crop_boxes"][index]],
                },
            )

    def _generate_masks(self, image: np.ndarray) -> Any:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = self.amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        self.points_per_batch = planned_batch(self.points_per_batch, orig_size, self.choice, self.memory_budget)
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
        rows, cols = self._resizes(crop_size)
        upsampler = MaskUpsampler(rows, cols, self._low_res_size())
        points_for_crop = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]
        batches = []
        for (points,) in self.amg.batch_iterator(self.points_per_batch, points_for_crop):
            batches.append(self._process_batch(points, crop_size, crop_box, orig_size, upsampler))
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
        data["crop_boxes"] = torch.as_tensor(crop_box).repeat(len(data["windows"]), 1)
        return data

    def _low_res_size(self) -> tuple[int, int]:
        side = self.predictor.model.image_encoder.img_size // 4  # SAM's decoders upscale the embedding 4x
        return (side, side)

    def _nms_priority(self, data: Any) -> torch.Tensor:
        if self.choice == "best":
            return data["iou_preds"].float()
        areas = data["areas"].float()
        return areas if self.choice == "largest" else -areas

    def _process_batch(
        self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...],
        upsampler: MaskUpsampler,
    ) -> Any:
        """Upstream's per-batch steps (predicted-IoU filter, stability, boxes, the edge rule),
        on windows: the batch's masks exist at image resolution one at a time, within their box."""
        low, iou_preds = self._predict_points(points, im_size)
        per_point = low.shape[1]
        iou_preds = iou_preds.flatten(0, 1).float().cpu()
        point_idx = torch.arange(len(points)).repeat_interleave(per_point)
        rows = torch.arange(len(iou_preds))
        if self.pred_iou_thresh > 0.0:
            rows = rows[iou_preds > self.pred_iou_thresh]
        low = low.flatten(0, 1)[rows].float().cpu().numpy()
        windows = [upsampler.mask(logits, self.mask_threshold, self.stability_score_offset) for logits in low]
        del low
        data = self.amg.MaskData(
            windows=windows,
            iou_preds=iou_preds[rows],
            points=torch.as_tensor(np.repeat(points, per_point, axis=0))[rows],
            point_idx=point_idx[rows],
            stability_score=torch.tensor([w.stability for w in windows], dtype=torch.float32),
            boxes=torch.tensor([w.box for w in windows], dtype=torch.long).reshape(-1, 4),
            areas=torch.tensor([w.area for w in windows], dtype=torch.long),
        )
        if self.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= self.stability_score_thresh)
        data.filter(~self._near_edge(data["boxes"], crop_box, orig_size))
        if self.choice in _ONE_PER_POINT:
            data.filter(self._one_per_point(data))
        del data["point_idx"]
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
            key = data["iou_preds"].float()
        else:
            key = data["areas"].float()
            key = key if self.choice == "largest" else -key
        order = torch.argsort(key, descending=True, stable=True)
        _, first = np.unique(data["point_idx"][order].numpy(), return_index=True)
        return order[torch.as_tensor(first, dtype=torch.long)]

    def _small_regions(self, data: Any, image_size: tuple[int, int], nms_thresh: float) -> Any:
        """Upstream's ``postprocess_small_regions`` (holes, then islands, smaller than
        ``min_mask_region_area``; NMS preferring unchanged masks), one mask's frame at a time."""
        if len(data["windows"]) == 0:
            return data
        changed_masks, boxes, scores = [], [], []
        for window, box in zip(data["windows"], data["boxes"].tolist()):
            frame = np.zeros(image_size, bool)  # connectivity is the whole image's, as upstream's
            pixels = window.pixels()
            frame[box[1]:box[1] + pixels.shape[0], box[0]:box[0] + pixels.shape[1]] = pixels
            frame, holes = self.amg.remove_small_regions(frame, self.min_mask_region_area, mode="holes")
            frame, islands = self.amg.remove_small_regions(frame, self.min_mask_region_area, mode="islands")
            changed = window_of(frame) if holes or islands else None
            changed_masks.append(changed)
            boxes.append(changed.box if changed is not None else tuple(box))
            scores.append(1.0 if changed is None else 0.0)
        new_boxes = torch.tensor(boxes, dtype=torch.long)
        keep = batched_nms(new_boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), iou_threshold=nms_thresh)
        for index in keep.tolist():
            if changed_masks[index] is not None:
                data["windows"][index] = changed_masks[index]
                data["boxes"][index] = new_boxes[index]
        data.filter(keep)
        return data


def window_of(frame: np.ndarray) -> WindowMask:
    """A full-frame mask as a packed window with its box (inclusive ends, as upstream's)."""
    rows = np.flatnonzero(frame.any(1))
    if rows.size == 0:
        return WindowMask.of(np.zeros((1, 1), bool), float("nan"))
    cols = np.flatnonzero(frame.any(0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return WindowMask.of(frame[top:bottom + 1, left:right + 1], float("nan"), (left, top, right, bottom))


class _Sam1Hooks(_SamapiGenerator):
    image_set_flag = "is_image_set"

    @property
    def mask_threshold(self) -> float:  # type: ignore[override]
        return self.predictor.model.mask_threshold

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # SamPredictor.predict_torch up to its postprocessing (which upsamples the whole batch)
        predictor = self.predictor
        model = predictor.model
        coords = torch.as_tensor(predictor.transform.apply_coords(points, im_size), device=predictor.device)
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        return model.mask_decoder(
            image_embeddings=predictor.features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=self.multimask_output,
        )

    def _resizes(self, im_size: tuple[int, ...]) -> tuple[list[Resize], list[Resize]]:
        # Sam.postprocess_masks: to the padded input side, the padding cut, then to the crop's size
        side = self.predictor.model.image_encoder.img_size
        input_size = self.predictor.input_size
        return ([(side, input_size[0]), (im_size[0], im_size[0])], [(side, input_size[1]), (im_size[1], im_size[1])])


class _Sam2Hooks(_SamapiGenerator):
    image_set_flag = "_is_image_set"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # upstream hands min_mask_region_area to the predictor's low-res hole filling (CUDA-only);
        # a plain predictor leaves it to the full-resolution post-processing in detections()
        self.predictor = type(self.predictor)(self.predictor.model)

    def _low_res_size(self) -> tuple[int, int]:
        side = self.predictor.model.image_size // 4
        return (side, side)

    def _predict_points(self, points: np.ndarray, im_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # SAM2ImagePredictor._predict up to its postprocessing
        predictor = self.predictor
        model = predictor.model
        coords = predictor._transforms.transform_coords(
            torch.as_tensor(points, dtype=torch.float32, device=predictor.device), normalize=True, orig_hw=im_size
        )
        labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
        sparse, dense = model.sam_prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        features = predictor._features
        low, iou_preds, _, _ = model.sam_mask_decoder(
            image_embeddings=features["image_embed"][-1].unsqueeze(0), image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=self.multimask_output,
            repeat_image=len(coords) > 1, high_res_features=[level[-1].unsqueeze(0) for level in features["high_res_feats"]],
        )
        return low, iou_preds

    def _resizes(self, im_size: tuple[int, ...]) -> tuple[list[Resize], list[Resize]]:
        return [(im_size[0], im_size[0])], [(im_size[1], im_size[1])]  # SAM2Transforms.postprocess_masks


def _joined(amg: Any, parts: list[Any]) -> Any:
    """One MaskData of several (MaskData.cat deep-copies every list item it appends)."""
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
def planned_batch(requested: int, image_hw: tuple[int, ...], choice: MaskChoice, budget: int | None) -> int:
    """Points decoded at once within ``budget`` (the whole image is the largest crop)."""
    return automask_batch(requested, image_hw[0] * image_hw[1], 1 if choice == "single" else 3, budget)


def check_budget(ctx: RunContext) -> None:
    """Refuse an automask that cannot fit ``ctx.memory_budget`` even one point at a time, before
    its image is encoded."""
    planned_batch(1, ctx.image.shape[:2], ctx.sidecar.mask_choice, ctx.memory_budget)


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
    return cls(predictor.model, _params(ctx), ctx.sidecar.mask_choice, ctx.progress, embedding, ctx.memory_budget)


def build_sam2_generator(sam2_model: Any, ctx: RunContext, embedding: Embedding | None = None) -> Any:
    cls = _generator_class(_Sam2Hooks, "sam2.automatic_mask_generator", "SAM2AutomaticMaskGenerator")
    return cls(sam2_model, _params(ctx), ctx.sidecar.mask_choice, ctx.progress, embedding, ctx.memory_budget)


def generate_sam1(predictor: Any, ctx: RunContext, *, embedding: Embedding | None = None) -> Iterator[Detection]:
    """Automask with a ``SamPredictor``'s model; ``embedding``: the predictor's ``features``,
    ``original_size`` and ``input_size`` for ``ctx.image`` (then the whole image is not encoded
    again). The generator works on a predictor of its own: the adapter's is left as it was.
    The masks are found at once; each detection is made as it is taken."""
    return build_sam1_generator(predictor, ctx, embedding).detections(ctx.image)


def generate_sam2(sam2_model: Any, ctx: RunContext, *, embedding: Embedding | None = None) -> Iterator[Detection]:
    """Automask with a SAM2 model; ``embedding``: a ``SAM2ImagePredictor``'s ``_features`` and
    ``_orig_hw`` for ``ctx.image`` (then the whole image is not encoded again)."""
    return build_sam2_generator(sam2_model, ctx, embedding).detections(ctx.image)
