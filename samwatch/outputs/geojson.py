"""A result's shapes as the GeoJSON QuPath imports: classification, colour, measurements,
the plane inside the geometry, the job's metadata beside the features."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from samwatch.outputs.shapes import Shape, class_color

OBJECT_TYPES = ("annotation", "detection")

#: property -> its QuPath measurement name. QuPath's "Import objects" keeps only name, color,
#: classification, isLocked, measurements and metadata of a feature's properties, so scores
#: must also be measurements to survive the import (and be filterable there).
QUPATH_MEASUREMENTS = {
    "quality": "SAM quality",
    "stability_score": "SAM stability score",
    "object_idx": "SAM object index",
    "prompt_idx": "SAM prompt index",
    "mask_idx": "SAM mask index",
    "obj_id": "SAM object id",
    "frame": "SAM frame",
    "source_index": "SAM source index",
}


def qupath_measurements(properties: dict[str, Any]) -> dict[str, float]:
    return {
        name: value for key, name in QUPATH_MEASUREMENTS.items()
        if isinstance(value := properties.get(key), int | float) and not isinstance(value, bool)
    }


def make_feature(
    geometry: dict[str, Any],
    *,
    label: str,
    object_type: str = "annotation",
    color: list[int] | None = None,
    plane: dict[str, int] | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A GeoJSON Feature as QuPath imports it.

    ``plane`` (e.g. ``{"c": -1, "z": 0, "t": 3}``) goes inside the geometry, where QuPath
    and samapi put it. ``properties`` adds caller fields (object_idx, quality, ...); it may
    not redefine ``objectType`` or ``classification``, which come from the arguments. The
    scores and indices among them are repeated as QuPath ``measurements``, and a feature with
    a quality gets the ``name`` QuPath's SAM extension gives its objects.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    extra = dict(properties or {})
    clash = {"objectType", "classification"} & extra.keys()
    if clash:
        raise ValueError(f"properties may not set {sorted(clash)}; use the arguments")
    geometry = dict(geometry) if plane is None else {**geometry, "plane": dict(plane)}
    colour = class_color(label) if color is None else list(color)
    classification = {"name": label, "color": colour}
    measurements = qupath_measurements(extra)
    qupath: dict[str, Any] = {"measurements": measurements} if measurements else {}
    if "SAM quality" in measurements:
        qupath["name"] = f"SAM (Quality={extra['quality']:.2f})"
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": object_type, "classification": classification, **qupath, **extra},
    }


def shape_feature(shape: Shape) -> dict[str, Any]:
    """``shape`` as its GeoJSON Feature; rings stay arrays (orjson writes them directly)."""
    polygons = [list(polygon) for polygon in shape.polygons]
    geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                else {"type": "MultiPolygon", "coordinates": polygons})
    properties: dict[str, Any] = {
        "object_idx": shape.object_idx, "prompt_idx": shape.prompt_idx, "label": shape.name,
        "quality": shape.quality, "sam_model": shape.model,
    }
    if shape.mask_idx is not None:
        properties["mask_idx"] = shape.mask_idx
    if shape.obj_id is not None:
        properties["obj_id"] = shape.obj_id
    if shape.frame is not None:
        properties["frame"] = shape.frame
    properties.update(shape.extra)
    plane = None if shape.zt is None else {"c": -1, "z": shape.zt[0], "t": shape.zt[1]}
    return make_feature(geometry, label=shape.name, color=list(shape.color), object_type=shape.object_type,
                        plane=plane, properties=properties)


def feature_collection(features: Iterable[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with samwatch's job metadata under ``"samwatch"``."""
    return {"type": "FeatureCollection", "features": list(features), "samwatch": meta}


def result_collection(shapes: Iterable[Shape], meta: dict[str, Any]) -> dict[str, Any]:
    """A job's result: its shapes as features, with the job's metadata."""
    return feature_collection((shape_feature(shape) for shape in shapes), meta)
