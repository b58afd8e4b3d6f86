"""``img001.preview.png``: the image, downsampled, with every feature drawn in its class colour.

Outlines for prompted results; automask results also fill each object semi-transparently
(there the objects tile the image and outlines alone read as noise). The prompts are drawn too:
boxes as thin yellow rectangles, points as dots (green foreground, magenta background). A
``view`` shows one part of the image (a job's region, or the features' extent on a slide) at
the preview's size, instead of the whole image. Stacks and videos get a
contact sheet of up to ``MAX_PLANES`` planes spread evenly over the sequence, each labelled
with its plane index. An empty result has no preview: the image alone says nothing about
the segmentation, and a missing preview next to a result with zero features is unambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from samwatch.outputs.shapes import Shape

MAX_PLANES = 16
FILL_OPACITY = 0.4
_SHIFT = 4  # fractional bits of cv2's drawing coordinates: outlines placed to 1/16 pixel
BOX_COLOR = (255, 215, 0)
POINT_COLORS = {1: (40, 220, 40), 0: (230, 40, 200)}
View = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels


@dataclass(frozen=True)
class PromptMark:
    """A prompt as drawn: a box (x0, y0, x1, y1), or a point (x, y) with its label."""

    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    label: int = 1

    def extent(self) -> tuple[float, float, float, float]:
        if self.box is not None:
            return self.box
        assert self.point is not None
        return (*self.point, *self.point)


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


def _points(shape: Shape, sx: float, sy: float, origin: tuple[float, float]) -> list[np.ndarray]:
    # A ring vertex at image corner coordinate X sits at preview coordinate (X - origin) * s,
    # which is cv2's pixel-centre coordinate (X - origin) * s - 0.5.
    # All rings at once: a noisy mask has thousands of tiny rings, and numpy calls per ring
    # cost twenty times the arithmetic.
    factor = np.array([sx, sy]) * (1 << _SHIFT)
    offset = 0.5 * (1 << _SHIFT)
    placed = np.round((np.concatenate(shape.rings) - np.array(origin)) * factor - offset).astype(np.int32)
    ends = np.cumsum([len(ring) for ring in shape.rings]).tolist()
    return [placed[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def draw(cell: np.ndarray, shapes: Sequence[Shape], sx: float, sy: float, *, filled: bool,
         origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``cell`` (RGB, at scale sx, sy of the image from ``origin``) with ``shapes`` drawn on it."""
    points = [_points(shape, sx, sy, origin) for shape in shapes]
    if filled and shapes:
        layer = cell.copy()
        for shape, rings in zip(shapes, points):
            cv2.fillPoly(layer, rings, shape.color, cv2.LINE_8, _SHIFT)
        cell = cv2.addWeighted(layer, FILL_OPACITY, cell, 1 - FILL_OPACITY, 0)
    for shape, rings in zip(shapes, points):
        cv2.polylines(cell, rings, True, shape.color, 1, cv2.LINE_8, _SHIFT)
    return cell


def draw_prompts(cell: np.ndarray, marks: Sequence[PromptMark], sx: float, sy: float,
                 origin: tuple[float, float]) -> None:
    def at(x: float, y: float) -> tuple[int, int]:
        return round((x - origin[0]) * sx), round((y - origin[1]) * sy)

    radius = max(3, round(min(cell.shape[:2]) / 200))
    for mark in marks:
        if mark.box is not None:
            cv2.rectangle(cell, at(*mark.box[:2]), at(*mark.box[2:]), BOX_COLOR, 1, cv2.LINE_8)
        elif mark.point is not None:
            centre = at(*mark.point)
            cv2.circle(cell, centre, radius + 1, (0, 0, 0), -1, cv2.LINE_AA)
            cv2.circle(cell, centre, radius, POINT_COLORS.get(mark.label, BOX_COLOR), -1, cv2.LINE_AA)


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
    view: View | None = None,
    prompts: Sequence[PromptMark] = (),
) -> np.ndarray | None:
    """The preview as an RGB uint8 array, or None for an empty result.

    ``frame(i)`` gives plane ``i``'s ``view`` (default: the whole image) as RGB uint8, at any
    resolution (a slide's from a coarser level); it is read only for the planes shown.
    """
    if not shapes:
        return None
    x0, y0, x1, y1 = view or (0, 0, width, height)
    planes = contact_planes(n_frames)
    columns, rows, cell_w, cell_h = sheet_layout(x1 - x0, y1 - y0, len(planes), size)
    sx, sy = cell_w / (x1 - x0), cell_h / (y1 - y0)
    by_plane: dict[int, list[Shape]] = {}
    for shape in shapes:
        if shape.overlaps(x0, y0, x1, y1):
            by_plane.setdefault(shape.plane, []).append(shape)
    sheet = np.zeros((rows * cell_h, columns * cell_w, 3), np.uint8)
    for position, plane in enumerate(planes):
        image = frame(plane)
        cell = cv2.resize(image, (cell_w, cell_h), interpolation=cv2.INTER_AREA) if image.shape[:2] != (cell_h, cell_w) else image.copy()
        cell = draw(cell, by_plane.get(plane, []), sx, sy, filled=filled, origin=(x0, y0))
        draw_prompts(cell, prompts, sx, sy, (x0, y0))
        if n_frames > 1:
            _caption(cell, f"{plane_letter}={plane}")
        row, column = divmod(position, columns)
        sheet[row * cell_h:(row + 1) * cell_h, column * cell_w:(column + 1) * cell_w] = cell
    return sheet


def features_view(shapes: Sequence[Shape], marks: Sequence[PromptMark], width: int, height: int) -> View:
    """The part of the image holding the features and prompts, with a margin of a fifth of
    its size (at least 64 px) for context."""
    boxes = [shape.box for shape in shapes] + [mark.extent() for mark in marks]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = max(64.0, (right - left) / 5, (bottom - top) / 5)
    return (max(0, int(left - margin)), max(0, int(top - margin)),
            min(width, math.ceil(right + margin)), min(height, math.ceil(bottom + margin)))


def encode_png(rgb: np.ndarray) -> bytes:
    # Level 1: previews are looked at, not archived; higher levels cost several times more.
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()
