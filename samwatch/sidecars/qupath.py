"""QuPath GeoJSON exports as prompts: each annotation one object to refine, its class kept.

QuPath writes two shapes with File > Export objects as GeoJSON: a FeatureCollection (0.4+:
feature ``id`` a UUID, ``properties.objectType``, classification ``{name, color: [r, g, b]}``)
and a bare array of features (0.2/0.3: ``id`` the object's Java class such as
``PathAnnotationObject``, classification ``colorRGB`` a signed 32-bit int). Both are read.

Prompts are built the way QuPath's SAM extension builds them from the objects of a viewer
(qupath-extension-sam, ``SAMMainCommand``/``SAMDetectionTask``): an area (rectangle, polygon,
ellipse: all polygons in an export) is a box prompt of its bounds; a point annotation is one
object prompted with all its points; a line is prompted with its vertices; points and lines whose
class is an *ignored* class (QuPath's ``Ignore*``: a name ending in ``*``) are background
points of the prompts around them and never objects of their own.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from samwatch.config import LimitSettings
from samwatch.errors import JobError
from samwatch.sidecars.schema import AnnotationsSpec, Prompt, Sidecar

#: 0.2/0.3 exports name the object type by its Java class in the feature's ``id``.
_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
    "PathTileObject": "tile", "PathTMACoreObject": "tma_core", "PathRootObject": "root",
}
#: A freehand polyline has hundreds of vertices; SAM wants a few points.
MAX_LINE_POINTS = 16
#: Background points join a prompt when within its bounds grown by its own size on every side,
#: at least this many pixels (the extension reads the rectangle padded so, 128 px at least).
MIN_BACKGROUND_MARGIN = 128.0
#: Warnings listed in the result; the rest are counted (an export of 10⁵ broken features must not
#: double the result's size).
MAX_LISTED_WARNINGS = 1000

Point = tuple[float, float]


@dataclass(frozen=True)
class Source:
    """The QuPath object a prompt refines: what its refined features carry back."""

    index: int  # the feature's position in the export
    id: str | None  # 0.4+ object id (a UUID); 0.2/0.3 exports have none
    name: str | None

    def properties(self, file: str) -> dict[str, Any]:
        """Feature properties linking back; ``metadata`` (strings) and ``source_index`` (a
        measurement) are what survive QuPath's import, which keeps only name, color,
        classification, isLocked, measurements and metadata."""
        metadata = {"source_file": file, "source_index": str(self.index)}
        linked: dict[str, Any] = {"source_index": self.index}
        if self.id is not None:
            linked["source_id"] = metadata["source_id"] = self.id
        if self.name is not None:
            linked["name"] = self.name
        return {**linked, "metadata": metadata}


@dataclass
class Imported:
    """A job's prompts after its export was read: its own first, then one per object."""

    sidecar: Sidecar
    sources: list[Source | None]  # aligned with sidecar.prompts (None: the sidecar's own)
    report: dict[str, Any] = field(default_factory=dict)  # the result's samwatch.annotations


def read_export(path: Path, rel: str, limits: LimitSettings) -> list[Any]:
    """The features of the export at ``path`` (inbox-relative ``rel``), within the limits."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise JobError("annotations_not_found", f"The QuPath export {rel!r} does not exist; copy it into the inbox "
                       "or fix 'annotations'.", file=rel, field="annotations") from None
    if size > limits.max_annotation_bytes:
        raise JobError("annotations_too_large", f"The export is {size} bytes, more than limits.max_annotation_bytes "
                       f"({limits.max_annotation_bytes}); export fewer objects (select them, then File > Export "
                       "objects as GeoJSON > Selected objects) or raise the limit.", file=rel, field="annotations")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise JobError("annotations_invalid", f"The export is not JSON ({exc}); export it again from QuPath with "
                       "File > Export objects as GeoJSON.", file=rel, field="annotations") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
        features = data["features"]
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise JobError("annotations_invalid", "The export is JSON but not GeoJSON: a FeatureCollection, a Feature or "
                       "an array of features (what QuPath's File > Export objects as GeoJSON writes).",
                       file=rel, field="annotations")
    features = _with_children(features)
    if len(features) > limits.max_annotations:
        raise JobError("annotations_too_large", f"The export holds {len(features)} objects, more than "
                       f"limits.max_annotations ({limits.max_annotations}); export only the annotations to refine "
                       "or raise the limit.", file=rel, field="annotations")
    return features


def _with_children(features: list[Any]) -> list[Any]:
    """Features with the ``childObjects`` QuPath may nest in them, each after its parent."""
    flat: list[Any] = []
    pending = list(reversed(features))
    while pending:
        feature = pending.pop()
        flat.append(feature)
        properties = feature.get("properties") if isinstance(feature, dict) else None
        children = properties.get("childObjects") if isinstance(properties, dict) else None
        if isinstance(children, list):
            pending.extend(reversed(children))
    return flat


@dataclass
class _Object:
    index: int
    source: Source
    label: str | None
    color: tuple[int, int, int] | None
    bbox: tuple[float, float, float, float] | None = None
    points: list[Point] = field(default_factory=list)


class _Reader:
    """One pass over an export's features, noting what each became."""

    def __init__(self, spec: AnnotationsSpec, rel: str, bounds: tuple[int, int, int, int], surface: str) -> None:
        self.spec, self.rel = spec, rel
        self.bounds, self.surface = bounds, surface  # where prompts may lie (level-0 pixels)
        self.objects: list[_Object] = []
        self.point_objects: list[_Object] = []
        self.background: list[Point] = []
        self.skipped: Counter[str] = Counter()
        self.warnings: list[dict[str, Any]] = []

    def warn(self, index: int, source_id: str | None, code: str, message: str) -> None:
        entry = {"index": index, "code": code, "message": message}
        if source_id is not None:
            entry["id"] = source_id
        if self.spec.strict:
            raise JobError(code, f"Feature {index}{f' (id {source_id})' if source_id else ''} of the export: {message} "
                           "(annotations.strict: true fails the job on it; false skips it).",
                           file=self.rel, field=f"features.{index}", index=index, id=source_id)
        self.warnings.append(entry)

    def read(self, index: int, feature: Any) -> None:
        if not isinstance(feature, dict) or not isinstance(feature.get("properties") or {}, dict):
            self.warn(index, None, "annotation_invalid", "not a GeoJSON Feature object")
            return
        properties = feature.get("properties") or {}
        raw_id = feature.get("id")
        object_type = properties.get("objectType") or _LEGACY_TYPES.get(raw_id) or "annotation"
        source_id = str(raw_id) if raw_id is not None and raw_id not in _LEGACY_TYPES else None
        if object_type not in self.spec.object_types:
            self.skipped[object_type] += 1
            return
        label, color = _classification(properties.get("classification"))
        name = properties.get("name") if isinstance(properties.get("name"), str) else None
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            self.warn(index, source_id, "annotation_invalid", "the feature has no geometry")
            return
        try:
            kind, coordinates = _coordinates(geometry)
        except ValueError as exc:
            self.warn(index, source_id, "annotation_invalid", str(exc))
            return
        if not coordinates:
            self.warn(index, source_id, "annotation_invalid",
                      f"its {geometry.get('type')} has no coordinates, so there is nothing to prompt with")
            return
        ignored = label is not None and label.endswith("*")
        if ignored and kind == "area":
            self.skipped["ignored_class"] += 1
            return
        if kind == "line":
            coordinates = _spread(coordinates, MAX_LINE_POINTS)
        x0, y0, x1, y1 = self.bounds
        inside = [(x, y) for x, y in coordinates if x0 <= x <= x1 and y0 <= y <= y1]
        if kind != "area" and not inside or kind == "area" and not _overlaps(coordinates, self.bounds):
            self.warn(index, source_id, "prompt_out_of_bounds",
                      f"it lies outside the {self.surface} (coordinates are level-0 pixels)")
            return
        if ignored:
            self.background.extend(inside)
            return
        obj = _Object(index, Source(index, source_id, name), label, color)
        if kind == "area":
            xs, ys = [x for x, _ in coordinates], [y for _, y in coordinates]
            obj.bbox = (max(float(x0), min(xs)), max(float(y0), min(ys)), min(float(x1), max(xs)),
                        min(float(y1), max(ys)))
        else:
            obj.points = inside  # points off the image are dropped, as the extension drops them
        (self.objects if kind == "area" else self.point_objects).append(obj)

    def prompts(self) -> tuple[list[Prompt], list[Source]]:
        points = self.point_objects
        if self.spec.points_inside:
            points = [obj for obj in points if not _joined(obj, self.objects)]
        chosen = sorted([*self.objects, *points], key=lambda obj: obj.index)
        by_x = sorted(self.background)
        xs_sorted = [x for x, _ in by_x]
        prompts = []
        for obj in chosen:
            background = _near(obj, by_x, xs_sorted)
            foreground = list(obj.points)
            prompts.append(Prompt(
                bbox=obj.bbox, points=foreground + background,
                point_labels=[1] * len(foreground) + [0] * len(background) if background or foreground else None,
                label=obj.label, color=obj.color,
            ))
        return prompts, [obj.source for obj in chosen]


def import_annotations(sidecar: Sidecar, features: list[Any], rel: str, width: int, height: int) -> Imported:
    """The sidecar with the export's objects appended to its prompts (image ``width`` × ``height``)."""
    spec = sidecar.annotations
    assert spec is not None
    if sidecar.region is not None:  # only the region is segmented: objects elsewhere are outside
        x, y, w, h = sidecar.region
        reader = _Reader(spec, rel, (x, y, x + w, y + h), f"region [{x}, {y}, {w}, {h}]")
    else:
        reader = _Reader(spec, rel, (0, 0, width, height), f"{width}×{height} image")
    for index, feature in enumerate(features):
        reader.read(index, feature)
    prompts, sources = reader.prompts()
    report = {
        "file": rel, "features": len(features), "prompts": len(prompts), "background_points": len(reader.background),
        "skipped": dict(sorted(reader.skipped.items())), "warnings": reader.warnings[:MAX_LISTED_WARNINGS],
        "warnings_total": len(reader.warnings),
    }
    if not prompts and not sidecar.prompts:
        what = ", ".join(f"{count} {kind}" for kind, count in sorted(reader.skipped.items())) or "none usable"
        raise JobError(
            "annotations_empty",
            f"The export {rel!r} holds no object to refine ({len(features)} features; skipped: {what}; "
            f"{len(reader.warnings)} unusable). Export annotations (rectangles, polygons, points), or list the "
            "object types to use in annotations.object_types.",
            file=rel, field="annotations", problems=reader.warnings[:20],
        )
    combined = sidecar.model_copy(update={"prompts": [*sidecar.prompts, *prompts]})
    return Imported(combined, [None] * len(sidecar.prompts) + sources, report)


def _classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    """(name, colour); a derived class (0.4+: ``names: [Tumor, Positive]``) is named as QuPath
    shows it, "Tumor: Positive"."""
    if isinstance(value, dict) and isinstance(value.get("names"), list) and value["names"] \
            and all(isinstance(part, str) for part in value["names"]):
        value = {**value, "name": ": ".join(value["names"])}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None, None
    color = value.get("color", value.get("colorRGB"))
    if isinstance(color, int) and not isinstance(color, bool):  # 0.2/0.3: packed ARGB, signed
        color = [(color >> 16) & 255, (color >> 8) & 255, color & 255]
    if isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color):
        return value["name"], (color[0], color[1], color[2])
    return value["name"], None


def _coordinates(geometry: dict[str, Any]) -> tuple[str, list[Point]]:
    """(area | points | line, its vertices); a polygon's holes do not change its bounds."""
    kind = geometry.get("type")
    raw = geometry.get("coordinates")
    if kind in ("Point", "MultiPoint"):
        found = "points", [raw] if kind == "Point" else raw
    elif kind in ("LineString", "MultiLineString"):
        found = "line", raw if kind == "LineString" else _flatten(raw)
    elif kind in ("Polygon", "MultiPolygon"):
        rings = [raw[0]] if kind == "Polygon" and raw else [poly[0] for poly in raw or [] if poly]
        found = "area", _flatten(rings)
    else:
        raise ValueError(f"a {kind} geometry cannot be a prompt (areas, points and lines can)")
    name, points = found
    if not isinstance(points, list):
        raise ValueError(f"its {kind} coordinates are not a list")
    checked = []
    for point in points:
        if not (isinstance(point, list) and len(point) >= 2 and all(_finite(v) for v in point[:2])):
            raise ValueError(f"its {kind} has a coordinate that is not [x, y] numbers: {str(point)[:60]}")
        checked.append((float(point[0]), float(point[1])))
    return name, checked


def _flatten(parts: Any) -> list[Any]:
    if not isinstance(parts, list) or not all(isinstance(part, list) for part in parts):
        raise ValueError("its coordinates are not nested lists")
    return [point for part in parts for point in part]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _overlaps(points: list[Point], bounds: tuple[int, int, int, int]) -> bool:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return min(xs) < bounds[2] and max(xs) > bounds[0] and min(ys) < bounds[3] and max(ys) > bounds[1]


def _spread(points: list[Point], most: int) -> list[Point]:
    if len(points) <= most:
        return points
    return [points[round(i * (len(points) - 1) / (most - 1))] for i in range(most)]


def _joined(obj: _Object, areas: list[_Object]) -> bool:
    """With points_inside: a point annotation inside an area's box becomes that area's (the
    smallest such area) foreground points."""
    holders = [a for a in areas if a.bbox and all(_in_box(p, a.bbox, 0.0) for p in obj.points)]
    if not holders:
        return False
    smallest = min(holders, key=lambda a: (a.bbox[2] - a.bbox[0]) * (a.bbox[3] - a.bbox[1]))
    smallest.points.extend(obj.points)
    return True


def _near(obj: _Object, background: list[Point], xs_sorted: list[float]) -> list[Point]:
    """The background points near ``obj``; ``background`` sorted by x, ``xs_sorted`` their x."""
    xs = [p[0] for p in obj.points] + ([obj.bbox[0], obj.bbox[2]] if obj.bbox else [])
    ys = [p[1] for p in obj.points] + ([obj.bbox[1], obj.bbox[3]] if obj.bbox else [])
    extent = (min(xs), min(ys), max(xs), max(ys))
    margin = max(MIN_BACKGROUND_MARGIN, extent[2] - extent[0], extent[3] - extent[1])
    # Bisected on x: a slide's export of 10⁵ objects and 10⁴ ignored points stays fast.
    low, high = bisect_left(xs_sorted, extent[0] - margin), bisect_right(xs_sorted, extent[2] + margin)
    return [p for p in background[low:high] if _in_box(p, extent, margin)]


def _in_box(point: Point, box: tuple[float, float, float, float], margin: float) -> bool:
    return box[0] - margin <= point[0] <= box[2] + margin and box[1] - margin <= point[1] <= box[3] + margin
