"""QuPath GeoJSON exports as QuPath writes them: 0.4+ FeatureCollections and 0.2/0.3 bare arrays."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any


def rectangle(x1: float, y1: float, x2: float, y2: float) -> dict[str, Any]:
    """A rectangle ROI as QuPath exports it: a closed polygon, corners clockwise from top-left."""
    return {"type": "Polygon", "coordinates": [[[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]]}


def polygon(points: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[*points, points[0]]]}


def multipoint(points: list[list[float]]) -> dict[str, Any]:
    return {"type": "MultiPoint", "coordinates": points}


def line(points: list[list[float]]) -> dict[str, Any]:
    return {"type": "LineString", "coordinates": points}


def feature_04(geometry: dict | None, cls: str | None = None, color: list[int] | None = None, *,
               name: str | None = None, object_type: str = "annotation", id: str | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {"objectType": object_type, "isLocked": False}
    if name is not None:
        properties["name"] = name
    if cls is not None:
        properties["classification"] = {"name": cls, "color": color or [200, 0, 0]}
    return {"type": "Feature", "id": id or str(uuid.uuid4()), "geometry": geometry, "properties": properties}


def feature_02(geometry: dict | None, cls: str | None = None, rgb: int | None = None, *,
               java_class: str = "PathAnnotationObject") -> dict[str, Any]:
    """0.2/0.3: ``id`` is the Java class, ``colorRGB`` a signed packed ARGB int, measurements a list."""
    properties: dict[str, Any] = {"isLocked": False, "measurements": []}
    if cls is not None:
        properties["classification"] = {"name": cls, "colorRGB": rgb if rgb is not None else -3670016}
    return {"type": "Feature", "id": java_class, "geometry": geometry, "properties": properties}


def signed_rgb(r: int, g: int, b: int) -> int:
    packed = (255 << 24) | (r << 16) | (g << 8) | b
    return packed - (1 << 32)


def write_collection(path: Path, features: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_array(path: Path, features: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(features))
    return path
