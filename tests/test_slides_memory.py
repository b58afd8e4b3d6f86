"""Reading regions of a 40 000-px slide keeps memory flat (each size measured in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slides import blank_slide, write_ome_pyramid

# Opens the slide, reads 1024-px windows on a grid over all of it (and one of the coarsest level),
# checks the pixels of windows on the content patches, prints peak RSS in MiB.
READER = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from slides import blank_slide
from samwatch.media.read import MediaLimits, open_region_source
from samwatch.media.pixels import ChannelRule
size = int(sys.argv[3])
slide = blank_slide(size)
with open_region_source(sys.argv[1], limits=MediaLimits(), channels=ChannelRule()) as source:
    for y in np.linspace(0, size - 1024, 6).astype(int):
        for x in np.linspace(0, size - 1024, 6).astype(int):
            source.read_region(int(x), int(y), 1024, 1024)
    for x, y, _ in slide.patches:
        assert (source.read_region(x - 100, y - 100, 1024, 1024) == slide.expected(x - 100, y - 100, 1024, 1024)).all()
    last = len(source.levels) - 1
    source.read_region(0, 0, 8192, 8192, level=last)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def peak_rss_mib(path: Path, size: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", READER, str(path), str(Path(__file__).parent), str(size)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_reading_a_40k_slide_peaks_like_reading_a_4k_one(tmp_path):
    small = write_ome_pyramid(tmp_path / "4k.ome.tif", blank_slide(4096), levels=4)
    big = write_ome_pyramid(tmp_path / "40k.ome.tif", blank_slide(40_000), levels=4)
    assert big.stat().st_size < 40 * 2**20  # mostly one repeated blank tile, compressed
    small_mib, big_mib = peak_rss_mib(small, 4096), peak_rss_mib(big, 40_000)
    # Decoding the 40k slide whole would take 4.8 GB; reading it by region stays at the 4k figure.
    assert big_mib < 1.3 * small_mib + 60, (small_mib, big_mib)
