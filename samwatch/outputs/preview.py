"""``img001.preview.png``: the image, downsampled, with every feature drawn in its class colour.

Outlines for prompted results; automask results also fill each object semi-transparently
(there the objects tile the image and outlines alone read as noise). Stacks and videos get a
contact sheet of up to ``MAX_PLANES`` planes spread evenly over the sequence, each labelled
with its plane index. An empty result has no preview: the image alone says nothing about
the segmentation, and a missing preview next to a result with zero features is unambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from samwatch.outputs.shapes import Shape

MAX_PLANES = 16
FILL_OPACITY = 0.4
_SHIFT = 4  # fractional bits of cv2's drawing coordinates: outlines placed to 1/16 pixel


def contact_planes(n_frames: int) -> list[int]:
    """Up to MAX_PLANES plane indices spread evenly from the first to the last."""
    if n_frames <= MAX_PLANES:
        return list(range(n_frames))
    return sorted({round(i * (n_frames - 1) / (MAX_PLANES - 1)) for i in range(MAX_PLANES)})


def sheet_layout(width: int, height: int, n_cells: int, size: int) -> tuple[int, int, int, int]:
    """(columns, rows, cell width, cell height) of a sheet no larger than ``size`` a side,
    never enlarging the image."""
    columns = math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / columns)
    scale = min(1.0, size / max(width * columns, height * rows))
    return columns, rows, max(1, int(width * scale)), max(1, int(height * scale))


def _points(shape: Shape, sx: float, sy: float) -> list[np.ndarray]:
    # A ring vertex at image corner coordinate X sits at preview coordinate X * s, which is
    # cv2's pixel-centre coordinate X * s - 0.5.
    # All rings at once: a noisy mask has thousands of tiny rings, and numpy calls per ring
    # cost twenty times the arithmetic.
    factor = np.array([sx, sy]) * (1 << _SHIFT)
    offset = 0.5 * (1 << _SHIFT)
    placed = np.round(np.concatenate(shape.rings) * factor - offset).astype(np.int32)
    ends = np.cumsum([len(ring) for ring in shape.rings]).tolist()
    return [placed[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def draw(cell: np.ndarray, shapes: Sequence[Shape], sx: float, sy: float, *, filled: bool) -> np.ndarray:
    """``cell`` (RGB, at scale sx, sy of the image) with ``shapes`` drawn on it."""
    points = [_points(shape, sx, sy) for shape in shapes]
    if filled and shapes:
        layer = cell.copy()
        for shape, rings in zip(shapes, points):
            cv2.fillPoly(layer, rings, shape.color, cv2.LINE_8, _SHIFT)
        cell = cv2.addWeighted(layer, FILL_OPACITY, cell, 1 - FILL_OPACITY, 0)
    for shape, rings in zip(shapes, points):
        cv2.polylines(cell, rings, True, shape.color, 1, cv2.LINE_8, _SHIFT)
    return cell


def _caption(cell: np.ndarray, text: str) -> None:
    scale = max(0.35, cell.shape[1] / 600)
    origin = (4, 4 + int(18 * scale))
    cv2.putText(cell, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(cell, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def render_preview(
    shapes: Sequence[Shape],
    frame: Callable[[int], np.ndarray],
    *,
    width: int,
    height: int,
    n_frames: int = 1,
    size: int = 1024,
    filled: bool = False,
    plane_letter: str = "t",
) -> np.ndarray | None:
    """The preview as an RGB uint8 array, or None for an empty result.

    ``frame(i)`` gives plane ``i`` as RGB uint8 (read only for the planes shown).
    """
    if not shapes:
        return None
    planes = contact_planes(n_frames)
    columns, rows, cell_w, cell_h = sheet_layout(width, height, len(planes), size)
    sx, sy = cell_w / width, cell_h / height
    by_plane: dict[int, list[Shape]] = {}
    for shape in shapes:
        by_plane.setdefault(shape.plane, []).append(shape)
    sheet = np.zeros((rows * cell_h, columns * cell_w, 3), np.uint8)
    for position, plane in enumerate(planes):
        image = frame(plane)
        cell = cv2.resize(image, (cell_w, cell_h), interpolation=cv2.INTER_AREA) if (cell_w, cell_h) != (width, height) else image.copy()
        cell = draw(cell, by_plane.get(plane, []), sx, sy, filled=filled)
        if n_frames > 1:
            _caption(cell, f"{plane_letter}={plane}")
        row, column = divmod(position, columns)
        sheet[row * cell_h:(row + 1) * cell_h, column * cell_w:(column + 1) * cell_w] = cell
    return sheet


def encode_png(rgb: np.ndarray) -> bytes:
    # Level 1: previews are looked at, not archived; higher levels cost several times more.
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
