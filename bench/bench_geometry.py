"""Benchmark samwatch.geometry.outline.mask_to_geometry against the samapi baseline.

samapi (the upstream server) outlined a mask with ``skimage.measure.find_contours`` at
level 0.5 on the zero-padded mask and kept only the longest contour. Both run here on the
same masks, in the same process; each case reports the best of several repeats.

    python bench/bench_geometry.py

The target is ours >= 5x faster overall. Our outlines are also checked to be exact
(rasterising them gives the mask back), which the baseline's are not.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage import data, filters, measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samwatch.geometry.outline import mask_to_geometry  # noqa: E402
from samwatch.geometry.raster import rasterize  # noqa: E402

TARGET = 5.0


def samapi_outline(mask: np.ndarray) -> list[list[float]]:
    """The core of samapi's utils.mask_to_geometry (without its geojson wrapping)."""
    contours = measure.find_contours(np.pad(mask, 1), 0.5)
    if not contours:
        return []
    contour = max(contours, key=len) - 1
    return contour[:, ::-1].tolist()


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """SAM-like masks: several smooth blobs, some with holes, some on the border."""
    return filters.gaussian(rng.standard_normal((size, size)), sigma) > 0.02


def single_object(rng: np.random.Generator, size: int) -> np.ndarray:
    """One large smooth object, like a SAM mask of a tissue region."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    wobble = filters.gaussian(rng.standard_normal((size, size)), size / 40) * size / 12
    return np.hypot(xx, yy) * 2.5 + wobble < 1


def cell(rng: np.random.Generator, frame: int) -> np.ndarray:
    """One irregular cell (radius 8-30 px) in a full frame, as SAM returns per prompt."""
    radius = rng.uniform(8, min(30, frame / 3.5))
    cy, cx = rng.uniform(radius * 1.4, frame - radius * 1.4, 2)
    yy, xx = np.mgrid[:frame, :frame]
    angle = np.arctan2(yy - cy, xx - cx)
    harmonics = sum(
        rng.uniform(0.02, 0.12) * np.sin(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    stretch = rng.uniform(0.6, 1.0)
    distance = np.hypot(xx - cx, (yy - cy) / stretch)
    return distance < radius * (1 + harmonics)


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function; repeats interleave them so load hits all alike."""
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def run_batch(
    outline: Callable[[np.ndarray], object], masks: list[np.ndarray]
) -> Callable[[], None]:
    def batch() -> None:
        for mask in masks:
            outline(mask)

    return batch


def cases() -> list[tuple[str, list[np.ndarray], int]]:
    """(name, masks, repeats): single masks, then batches timed as a whole."""
    rng = np.random.default_rng(2024)
    coins = data.coins()
    coin_labels = measure.label(coins > filters.threshold_otsu(coins), connectivity=1)
    coins_each = [coin_labels == k for k in np.argsort(np.bincount(coin_labels.ravel()))[-25:-1]]
    return [
        ("blobs 256x256", [smooth_noise(rng, 256, 12)], 20),
        ("blobs 512x512", [smooth_noise(rng, 512, 24)], 10),
        ("blobs 1024x1024", [smooth_noise(rng, 1024, 48)], 5),
        ("one object 1024x1024", [single_object(rng, 1024)], 5),
        ("coins otsu 303x384", [coins > filters.threshold_otsu(coins)], 10),
        ("camera otsu 512x512", [data.camera() > filters.threshold_otsu(data.camera())], 10),
        ("horse 328x400", [~data.horse()], 10),
        ("24 coins, one each 303x384", coins_each, 5),
        ("100 cells, one each 1024x1024", [cell(rng, 1024) for _ in range(100)], 3),
        ("100 cells, 96x96 crops", [cell(rng, 96) for _ in range(100)], 5),
    ]


def main() -> int:
    rows = []
    print(f"{'case':32s} {'samapi ms':>10s} {'ours ms':>9s} {'ratio':>7s}  exact")
    for name, masks, repeats in cases():
        exact = all(np.array_equal(rasterize(mask_to_geometry(m), m.shape), m) for m in masks)
        baseline, ours = best_times(
            [run_batch(samapi_outline, masks), run_batch(mask_to_geometry, masks)], repeats
        )
        rows.append((baseline, ours))
        ratio = baseline / ours
        print(f"{name:32s} {baseline * 1e3:10.2f} {ours * 1e3:9.2f} {ratio:6.1f}x  {exact}")
    total_baseline = sum(b for b, _ in rows)
    total_ours = sum(o for _, o in rows)
    geomean = math.exp(sum(math.log(b / o) for b, o in rows) / len(rows))
    worst = min(b / o for b, o in rows)
    overall = total_baseline / total_ours
    verdict = "PASS" if overall >= TARGET else "FAIL"
    print(
        f"summary: total {total_baseline * 1e3:.1f} ms vs {total_ours * 1e3:.1f} ms -> "
        f"{overall:.1f}x (geometric mean {geomean:.1f}x, worst case {worst:.1f}x); "
        f"target >= {TARGET:.0f}x: {verdict}"
    )
    return 0 if overall >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
