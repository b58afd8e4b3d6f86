"""The sidecar: a job's prompts and settings, one pydantic model, native and samapi forms.

A samapi request body saved as JSON (minus ``b64img``) is a valid sidecar: its keys are folded
into the native form before validation (``sidecars.samapi``), so the rest of samwatch only ever
sees the native :class:`Sidecar`. Parsing the text is ``sidecars.parse``'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from samwatch.config import OutputFormat
from samwatch.schema_errors import describe_validation_error
from samwatch.errors import JobError
from samwatch.families import MODEL_TYPES, ModelType

SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")
FOLDER_DEFAULTS_STEM = "samwatch"

#: Keys of a folder's ``samwatch.yaml`` that an image's own sidecar inherits when it does
#: not set them; prompts never are (they belong to one image).
INHERITED_KEYS = (
    "model", "type", "weights", "label", "color", "priority", "output", "channels",
    "normalize", "confidence_threshold", "tiling",
)

MaskChoice = Literal["single", "all", "largest", "smallest", "best"]
_OUTPUT_TYPE_CHOICE: dict[str, MaskChoice] = {
    "Single Mask": "single",
    "Multi-mask": "all",
    "Multi-mask (all)": "all",
    "Multi-mask (largest)": "largest",
    "Multi-mask (smallest)": "smallest",
    "Multi-mask (best quality)": "best",
}
#: QuPath's SAM extension names its choices "Single mask" and (enum names) MULTI_ALL, MULTI_LARGEST...
_OUTPUT_TYPE_ALIASES = {"multi all": "Multi-mask (all)", "multi largest": "Multi-mask (largest)",
                        "multi smallest": "Multi-mask (smallest)", "multi best quality": "Multi-mask (best quality)"}


def _spelling_key(value: str) -> str:
    return " ".join(value.lower().replace("-", " ").replace("_", " ").split())


_OUTPUT_TYPE_SPELLINGS = {
    **{_spelling_key(name): name for name in _OUTPUT_TYPE_CHOICE},
    **_OUTPUT_TYPE_ALIASES,
}


def _canonical_output_type(value: Any) -> Any:
    """Any spelling samapi or QuPath uses ("Single mask", "multi-mask (ALL)", ...) -> samapi's."""
    return _OUTPUT_TYPE_SPELLINGS.get(_spelling_key(value), value) if isinstance(value, str) else value


OutputType = Annotated[
    Literal[
        "Single Mask",
        "Multi-mask",
        "Multi-mask (all)",
        "Multi-mask (largest)",
        "Multi-mask (smallest)",
        "Multi-mask (best quality)",
    ],
    BeforeValidator(_canonical_output_type),
]

Box = tuple[float, float, float, float]
Point = tuple[float, float]
Color = tuple[int, int, int]


class StrictModel(BaseModel):
    # NaN and inf (YAML's .nan, .inf) are refused: they would pass every range check and end
    # up in the result as NaN, which is not JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def _check_box(box: Box | None) -> Box | None:
    if box is not None and not (box[2] >= box[0] and box[3] >= box[1]):
        raise ValueError("a box is [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")
    return box


def _check_color(color: Color | None) -> Color | None:
    if color is not None and not all(0 <= channel <= 255 for channel in color):
        raise ValueError("colour channels are 0-255")
    return color


class Prompt(StrictModel):
    """One object to segment: a box, points, a mask, or a combination."""

    bbox: Box | None = Field(None, description="[x1, y1, x2, y2] in pixels")
    points: list[Point] = Field(
        default_factory=list,
        validation_alias=AliasChoices("points", "point_coords"),
        description="[[x, y], ...] in pixels",
    )
    point_labels: list[Literal[0, 1]] | None = Field(
        None, description="1 foreground, 0 background; default all 1"
    )
    mask: str | None = Field(None, description="low-res mask prompt: a PNG next to the sidecar")
    b64mask: str | None = Field(None, description="samapi's base64 PNG mask prompt")
    label: str | None = None
    color: Color | None = None

    _box = field_validator("bbox")(_check_box)
    _color = field_validator("color")(_check_color)

    @model_validator(mode="after")
    def _consistent(self) -> Prompt:
        if self.bbox is None and not self.points and self.mask is None and self.b64mask is None:
            raise ValueError("a prompt needs a bbox, points or a mask")
        if self.point_labels is not None and len(self.point_labels) != len(self.points):
            raise ValueError(
                f"{len(self.points)} points but {len(self.point_labels)} point_labels"
            )
        if self.mask is not None and self.b64mask is not None:
            raise ValueError("give mask or b64mask, not both")
        return self

    @property
    def labels(self) -> list[int]:
        return list(self.point_labels) if self.point_labels is not None else [1] * len(self.points)


class AutomaskParams(StrictModel):
    """samapi's /sam/automask/ fields, with its defaults."""

    points_per_side: int | None = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = Field(0, ge=0)
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    min_mask_region_area: int = Field(0, ge=0)
    output_type: OutputType = "Single Mask"
    include_image_edge: bool = False


class VideoObject(StrictModel):
    """One object prompted on one frame (samapi's ``objs`` entries, both bodies)."""

    obj_id: int
    bbox: Box | None = None
    points: list[Point] = Field(
        default_factory=list, validation_alias=AliasChoices("points", "point_coords")
    )
    point_labels: list[Literal[0, 1]] | None = None
    text: str | None = Field(None, description="SAM3 concept prompt")
    boxes_xywh: list[Box] = Field(default_factory=list, description="SAM3 boxes, pixel x, y, w, h")
    box_labels: list[Literal[0, 1]] | None = None

    _box = field_validator("bbox")(_check_box)

    @model_validator(mode="after")
    def _consistent(self) -> VideoObject:
        if self.bbox is None and not self.points and self.text is None and not self.boxes_xywh:
            raise ValueError("an object needs a bbox, points, text or boxes_xywh")
        if self.point_labels is not None and len(self.point_labels) != len(self.points):
            raise ValueError(f"{len(self.points)} points but {len(self.point_labels)} point_labels")
        if self.box_labels is not None and len(self.box_labels) != len(self.boxes_xywh):
            raise ValueError(f"{len(self.boxes_xywh)} boxes_xywh but {len(self.box_labels)} box_labels")
        return self

    @property
    def labels(self) -> list[int]:
        return list(self.point_labels) if self.point_labels is not None else [1] * len(self.points)


class VideoSpec(StrictModel):
    axes: Literal["XYT", "XYZ"] = Field("XYT", description="which axis the frames run along")
    plane_position: int = Field(0, ge=0, description="index on the other of T/Z for hyperstacks")
    start_frame_idx: int | None = Field(None, ge=0)
    max_frame_num_to_track: int | None = Field(None, ge=1)
    reverse: bool = Field(False, description="also propagate backwards from start_frame_idx")
    objects: dict[int, list[VideoObject]] = Field(
        default_factory=dict, description="frame index -> objects prompted on that frame"
    )


class TilingSpec(StrictModel):
    """How a large image (or region) is cut into model-sized windows; see samwatch.tiling."""

    tile_size: int = Field(
        1024, ge=256,
        description="model pixels per tile side (the window around prompts too); at most what "
        "limits.max_image_pixels lets one decode hold",
    )
    overlap: int = Field(
        128, ge=0,
        description="model pixels shared by neighbouring tiles (the halo); objects up to this size are "
        "never cut, larger ones crossing a seam are joined",
    )
    level: int | None = Field(None, ge=0, description="pyramid level to segment at (0: full resolution)")
    downsample: float | None = Field(
        None, ge=1, description="segment at 1/downsample of full resolution (e.g. 2: 20x on a 40x slide)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TilingSpec:
        if self.overlap >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        if self.level is not None and self.downsample is not None:
            raise ValueError("give level or downsample, not both")
        return self


Region = tuple[int, int, int, int]


def _check_region(region: Region | None) -> Region | None:
    if region is not None and (region[0] < 0 or region[1] < 0 or region[2] <= 0 or region[3] <= 0):
        raise ValueError("a region is [x, y, width, height] in full-resolution pixels, x, y >= 0 and width, height > 0")
    return region


class OutputSpec(StrictModel):
    object_type: Literal["annotation", "detection"] | None = Field(
        None, description="QuPath object type of the results; none: the config's output.object_type"
    )
    simplify_tolerance: float = Field(0.0, ge=0, description="pixels; 0 keeps every contour vertex")
    formats: list[OutputFormat] | None = Field(None, description="as the config's output.formats; none: the config's")
    preview: bool | None = Field(None, description="as the config's output.preview; none: the config's")
    preview_size: int | None = Field(None, ge=64, le=8192, description="none: the config's output.preview_size")


QuPathObjectType = Literal["annotation", "detection", "cell", "tile", "tma_core"]


class AnnotationsSpec(StrictModel):
    """A QuPath GeoJSON export whose objects are the prompts (see samwatch.sidecars.qupath)."""

    file: str = Field(min_length=1, description="the export (.geojson), relative to the sidecar")
    object_types: list[QuPathObjectType] = Field(
        default_factory=lambda: ["annotation"],
        description="which QuPath objects become prompts; detections, cells, tiles and TMA cores are skipped "
        "unless listed",
    )
    points_inside: bool = Field(
        False, description="point annotations inside an area annotation's bounds become its foreground "
        "points instead of objects of their own",
    )
    strict: bool = Field(
        False, description="a feature that cannot be a prompt fails the job (default: it is skipped and "
        "listed in the result's samwatch.annotations.warnings)",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str) else data


class Sidecar(StrictModel):
    """A job: which model, which image, which prompts, what to write."""

    model: ModelType | None = Field(
        None, validation_alias=AliasChoices("model", "type"), description="alias: type"
    )
    weights: str | None = Field(None, description="a registry name; default from the config")
    image: str | None = Field(None, min_length=1, description="relative to the sidecar; default: same stem")
    label: str | None = None
    color: Color | None = None
    # The ledger stores it as SQLite's 64-bit integer; far smaller bounds are plenty.
    priority: int | None = Field(None, ge=-(10**9), le=10**9, description="higher runs first")
    prompts: list[Prompt] = Field(default_factory=list)
    annotations: AnnotationsSpec | None = Field(
        None, description="a QuPath GeoJSON export (path, or {file, object_types, points_inside, strict}): "
        "each object a prompt, its class kept",
    )
    multimask_output: bool = Field(False, description="three masks per prompt (all kept)")
    output_type: OutputType | None = Field(None, description="samapi's mask choice; overrides multimask_output")
    automask: AutomaskParams | None = None
    text: str | None = Field(None, description="SAM3 concept prompt")
    positive_bboxes: list[Box] = Field(default_factory=list)
    negative_bboxes: list[Box] = Field(default_factory=list)
    box_format: Literal["xyxy", "xywh"] = Field(
        "xyxy", description="of positive/negative_bboxes; samapi's SAM3 body (text_prompt) means xywh"
    )
    confidence_threshold: float = Field(0.5, ge=0, le=1)
    video: VideoSpec | None = None
    region: Region | None = Field(
        None, description="[x, y, width, height] in full-resolution (level-0) pixels: segment only this part"
    )
    tiling: TilingSpec | None = Field(None, description="tiles for images larger than one window; see README")
    output: OutputSpec = OutputSpec()
    channels: list[int] | None = Field(None, description="channels to R, G, B (0-based)")
    normalize: Literal["auto", "percentile", "minmax", "none"] = "auto"

    _color = field_validator("color")(_check_color)
    _region = field_validator("region")(_check_region)

    @model_validator(mode="after")
    def _annotations_are_prompts(self) -> Sidecar:
        clash = [key for key in ("video", "text", "automask") if getattr(self, key) is not None]
        if self.annotations is not None and (clash or self.positive_bboxes):
            raise ValueError(f"annotations are box and point prompts of an image; they cannot go with "
                             f"{', '.join(clash or ['positive_bboxes'])}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _fold_samapi_form(cls, data: Any) -> Any:
        # Imported here: samapi's key map is derived from these models (AutomaskParams' fields).
        from samwatch.sidecars.samapi import fold_samapi_form

        return fold_samapi_form(data) if isinstance(data, dict) else data

    @property
    def mask_choice(self) -> MaskChoice:
        if self.output_type is not None:
            return _OUTPUT_TYPE_CHOICE[self.output_type]
        if self.automask is not None:
            return _OUTPUT_TYPE_CHOICE[self.automask.output_type]
        return "all" if self.multimask_output else "single"

    @property
    def mode(self) -> Literal["video", "text", "prompts", "automask"]:
        """What kind of work this is; a sidecar with no prompts at all means automask."""
        if self.video is not None:
            return "video"
        if self.text is not None or self.positive_bboxes:
            return "text"
        if self.prompts or self.annotations is not None:
            return "prompts"
        return "automask"

    def boxes_xyxy(self, positive: bool) -> list[Box]:
        boxes = self.positive_bboxes if positive else self.negative_bboxes
        if self.box_format == "xyxy":
            return list(boxes)
        return [(x, y, x + w, y + h) for x, y, w, h in boxes]


def validate_sidecar(data: dict[str, Any], *, name: str) -> Sidecar:
    """The schema check; ``checkpoint_url`` is the job loader's (it needs the registry)."""
    if data.get("type") in ("FeatureCollection", "Feature"):  # else read as an unknown model "type"
        raise JobError(
            "sidecar_invalid",
            "This is GeoJSON (a QuPath export?), not a sidecar: name it NAME.geojson beside its image, or "
            "name it in a sidecar with 'annotations: FILE'.",
            file=name, field="type",
        )
    try:
        return Sidecar.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc, Sidecar)
        first_field = problems[0].split(":", 1)[0] if problems else None
        if any(problem["loc"][:1] in (("model",), ("type",)) for problem in exc.errors()):
            model = data.get("model", data.get("type"))
            raise JobError(
                "unknown_model",
                f"Unknown model type {model!r}; use one of {', '.join(MODEL_TYPES)}.",
                file=name, field="model",
            ) from None
        raise JobError(
            "sidecar_invalid",
            "The sidecar does not match the schema: " + "; ".join(problems) + ". "
            "See 'samwatch schema sidecar' for every key.",
            file=name,
            field=first_field,
            problems=problems,
        ) from None


def merge_folder_defaults(own: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """An image's own sidecar, with settings it leaves unset taken from folder defaults."""
    inherited = {key: value for key, value in defaults.items() if key in INHERITED_KEYS}
    if "model" in own or "type" in own:
        inherited.pop("model", None)
        inherited.pop("type", None)
    return {**inherited, **own}
