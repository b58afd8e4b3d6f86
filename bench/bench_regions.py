"""Region reads of slides: time per window and peak RSS, 4k vs 16k vs 40k, against whole decodes.

    python bench/bench_regions.py [--sizes 4096 16384 40000] [--windows 30]

Slides are pyramidal OME-TIFFs (512-px zlib tiles, 4 levels) where one tile in three is real
content (eight skimage tiles encoded once and cycled) and the others are white, so reads decode
real data while the 40k file stays near 2 GB on disk. For each size:
1. mean time of a 1024 x 1024 level-0 region read at random places, and of a 1024 x 1024 read at
   downsample 4 (a 4096-px field of view), vs decoding the same pixels as a whole 1024² TIFF
   (the baseline: what a plain image of the window's size costs)          target: ~1x, flat
2. peak RSS of a process that opens the slide and reads the windows, vs the 4k slide's
                                                                          target: flat (<= 1.3x)
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from samwatch.media.read import MediaLimits, open_region_source  # noqa: E402
from samwatch.media.pixels import ChannelRule  # noqa: E402
from slides import skimage_content  # noqa: E402

TILE = 512
LEVELS = 4


def write_textured(path: Path, size: int) -> Path:
    content = skimage_content(4 * TILE, 2 * TILE)
    blank = zlib.compress(np.full((TILE, TILE, 3), 255, np.uint8).tobytes(), 6)
    encoded = []
    for y, x in itertools.product(range(0, 4 * TILE, TILE), range(0, 2 * TILE, TILE)):
        encoded += [zlib.compress(content[y : y + TILE, x : x + TILE].tobytes(), 6), blank, blank]
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        for level in range(LEVELS):
            side = -(-size // 2**level)
            n_tiles = (-(-side // TILE)) ** 2
            tiles = itertools.islice(itertools.cycle(encoded), n_tiles)
            extra = dict(subifds=LEVELS - 1, metadata={"axes": "YXS"}) if level == 0 else dict(subfiletype=1)
            tw.write(tiles, shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
                     photometric="rgb", **extra)
    return path


def time_reads(path: Path, size: int, windows: int, level: int) -> float:
    rng = np.random.default_rng(0)
    span = 1024 * 2**level
    with open_region_source(path, limits=MediaLimits(), channels=ChannelRule()) as source:
        ds = 2**level
        started = time.perf_counter()
        for _ in range(windows):
            x, y = (int(v) // ds * ds for v in rng.integers(0, max(1, size - span), 2))
            source.read_region(x, y, span, span, level=level)
        return (time.perf_counter() - started) / windows


def time_whole_decode(windows: int) -> float:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, skimage_content(1024, 1024), compression="zlib")
    started = time.perf_counter()
    for _ in range(windows):
        buffer.seek(0)
        tifffile.imread(buffer)
    return (time.perf_counter() - started) / windows


def child(path: str, size: int, windows: int) -> None:
    for level in (0, 2):
        time_reads(Path(path), size, windows, level)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def peak_rss_mib(path: Path, size: int, windows: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", str(path), str(size), str(windows)],
                          capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 40000])
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    baseline = time_whole_decode(args.windows)
    print(f"baseline: decode a whole 1024x1024 zlib TIFF  {baseline * 1000:7.1f} ms")
    first_rss = None
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            started = time.perf_counter()
            path = write_textured(Path(scratch) / f"{size}.ome.tif", size)
            built = time.perf_counter() - started
            level0 = time_reads(path, size, args.windows, 0)
            level2 = time_reads(path, size, args.windows, 2)
            rss = peak_rss_mib(path, size, args.windows)
            first_rss = first_rss or rss
            print(f"{size:>6}² slide ({path.stat().st_size / 2**20:6.1f} MiB, built {built:4.1f} s): "
                  f"1024² read at level 0 {level0 * 1000:6.1f} ms ({level0 / baseline:4.2f}x baseline), "
                  f"4096² field at level 2 {level2 * 1000:6.1f} ms ({level2 / baseline:4.2f}x); "
                  f"peak RSS {rss} MiB ({rss / first_rss:4.2f}x the {args.sizes[0]}² slide)")


if __name__ == "__main__":
    main()
