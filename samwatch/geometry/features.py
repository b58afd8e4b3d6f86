"""GeoJSON Features and FeatureCollections as QuPath imports them: classification, colour,
measurements, the job's metadata."""

from __future__ import annotations

import colorsys
import hashlib
from typing import Any

OBJECT_TYPES = ("annotation", "detection")


def class_color(name: str) -> list[int]:
    """A stable, saturated [r, g, b] colour for a classification name.

    Derived from SHA-256 of the name, so it is the same in every process and run (Python's
    own ``hash`` is salted per process).
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:4], "big") / 2**32
    saturation = 0.55 + 0.35 * digest[4] / 255
    value = 0.75 + 0.20 * digest[5] / 255
    return [round(c * 255) for c in colorsys.hsv_to_rgb(hue, saturation, value)]


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


def feature_collection(features: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with samwatch's job metadata under ``"samwatch"``."""
    return {"type": "FeatureCollection", "features": list(features), "samwatch": meta}
