"""Low-resolution mask logits brought to image pixels one mask at a time, within the mask's own box.

SAM's decoders give 256×256 logits per mask. Upstream's automatic mask generators upsample a
whole point batch to the image's size before filtering it (64 points × 3 masks × 1024² float32
is 768 MiB, and each step of the filters makes another copy); samwatch never does. Upsampling is
bilinear, so each image pixel's logit is a convex combination of a few low-res logits: where all
of those are at or below a threshold, so is the pixel. The pixels of a mask above its lowest
threshold therefore lie in the rows and columns fed by the low-res rows and columns above it, and
only that window is computed, with the same taps and weights the full upsampling uses: counts
(stability), boxes and pixels are upstream's, while what is held is the size of the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Resize = tuple[int, int]
"""One bilinear resize (align_corners=False) of an axis: (length after the resize, length kept
after it); the kept part is the start, as SAM1 drops the input padding."""


def resize_matrix(low: int, steps: list[Resize]) -> torch.Tensor:
    """``steps`` applied to an axis of ``low`` samples, as a matrix (length after × low), float64."""
    matrix = torch.eye(low, dtype=torch.float64)
    for size, kept in steps:
        # the same interpolation the postprocessing runs, on the rows of an identity (columns unchanged)
        matrix = F.interpolate(matrix[None, None], size=(size, matrix.shape[1]), mode="bilinear",
                               align_corners=False)[0, 0][:kept]
    return matrix


class AxisTaps:
    """One axis's upsampling as taps: each output index reads ``index[o]`` low-res samples with
    ``weight[o]``; low-res sample ``i`` feeds outputs ``first[i]`` to ``last[i]``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        nonzero = matrix != 0
        taps = int(nonzero.sum(1).max())
        index = torch.argsort(nonzero.to(torch.int8), dim=1, descending=True, stable=True)[:, :taps]
        self.weight = matrix.gather(1, index).float().numpy()
        self.index = index.numpy()
        fed = nonzero.t().to(torch.int8)
        self.first = fed.argmax(1).numpy()
        self.last = matrix.shape[0] - 1 - fed.flip(1).argmax(1).numpy()

    def window(self, low_any: np.ndarray) -> tuple[int, int] | None:
        """The output span [start, end) fed by the low-res samples where ``low_any`` is true."""
        where = np.flatnonzero(low_any)
        if where.size == 0:
            return None
        return int(self.first[where[0]]), int(self.last[where[-1]]) + 1


@dataclass
class WindowMask:
    """One mask at image resolution, as much of it as holds pixels, bit-packed (what a job holds
    between steps is an eighth of the object's box): the mask is ``pixels()``, the tight box of
    its pixels; ``box`` (upstream's XYXY, inclusive ends, [0, 0, 0, 0] when empty) places it,
    ``area`` counts its pixels."""

    bits: np.ndarray
    shape: tuple[int, int]
    box: tuple[int, int, int, int]
    area: int
    stability: float

    @classmethod
    def of(cls, cropped: np.ndarray, stability: float, box: tuple[int, int, int, int] = (0, 0, 0, 0)) -> WindowMask:
        return cls(np.packbits(cropped, axis=None), cropped.shape, box, int(np.count_nonzero(cropped)), stability)

    def pixels(self) -> np.ndarray:
        count = self.shape[0] * self.shape[1]
        return np.unpackbits(self.bits, count=count).view(bool).reshape(self.shape)


_EMPTY = np.zeros((1, 1), bool)


class MaskUpsampler:
    """Low-res logits to image pixels, through per-axis resize chains (numpy: these small
    single-mask steps run far faster single-threaded than through a busy thread pool)."""

    def __init__(self, rows: list[Resize], cols: list[Resize], low: tuple[int, int]) -> None:
        self.rows = AxisTaps(resize_matrix(low[0], rows))
        self.cols = AxisTaps(resize_matrix(low[1], cols))

    def logits(self, low: np.ndarray, y: tuple[int, int], x: tuple[int, int]) -> np.ndarray:
        """The upsampled logits of rows ``y`` and columns ``x`` (spans), computed only there:
        columns first on the few low-res rows needed, then whole rows (contiguous copies)."""
        row_index, row_weight = self.rows.index[y[0]:y[1]], self.rows.weight[y[0]:y[1]]
        col_index, col_weight = self.cols.index[x[0]:x[1]], self.cols.weight[x[0]:x[1]]
        r0, c0 = int(row_index.min()), int(col_index.min())
        block = low[r0:int(row_index.max()) + 1, c0:int(col_index.max()) + 1]
        row_index, col_index = row_index - r0, col_index - c0
        by_cols = np.take(block, col_index[:, 0], axis=1) * col_weight[None, :, 0]
        for k in range(1, col_index.shape[1]):
            by_cols += np.take(block, col_index[:, k], axis=1) * col_weight[None, :, k]
        out = np.take(by_cols, row_index[:, 0], axis=0)
        out *= row_weight[:, :1]
        for k in range(1, row_index.shape[1]):
            part = np.take(by_cols, row_index[:, k], axis=0)
            part *= row_weight[:, k:k + 1]
            out += part
        return out

    def mask(self, low: np.ndarray, threshold: float, offset: float) -> WindowMask:
        """One mask's pixels above ``threshold`` and its stability score (upstream's
        ``calculate_stability_score``: pixels above threshold + offset over those above threshold - offset)."""
        above = low > threshold - abs(offset)
        y = self.rows.window(above.any(1))
        x = self.cols.window(above.any(0))
        if y is None or x is None:
            return WindowMask.of(_EMPTY, float("nan"))
        logits = self.logits(low, y, x)
        inside = np.count_nonzero(logits > threshold + offset)
        union = np.count_nonzero(logits > threshold - offset)
        # upstream divides int32 counts in float32 (0 / 0 is NaN, which fails any threshold)
        stability = float(np.float32(inside) / np.float32(union)) if union else float("nan")
        binary = logits > threshold
        rows = np.flatnonzero(binary.any(1))
        if rows.size == 0:
            return WindowMask.of(_EMPTY, stability)
        cols = np.flatnonzero(binary.any(0))
        top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        box = (x[0] + left, y[0] + top, x[0] + right, y[0] + bottom)
        return WindowMask.of(binary[top:bottom + 1, left:right + 1], stability, box)
