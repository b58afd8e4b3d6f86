"""Writes the newcomer's first images into INBOX: my_cells.tif (the README's first job) and a
tiled OME-TIFF slide.ome.tif; bright discs on a dark ground, so a box finds something."""

import sys
from pathlib import Path

import numpy as np
import tifffile

inbox = Path(sys.argv[1])
y, x = np.mgrid[0:303, 0:384]
cells = np.full((303, 384), 30, np.uint8)
for cx, cy, r in ((165, 125, 35), (310, 250, 25), (80, 230, 30)):
    cells[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = 200
tifffile.imwrite(inbox / "my_cells.tif", cells)
slide = np.tile(cells, (4, 4))  # 1212 x 1536, stored in 256-px tiles: a slide
tifffile.imwrite(inbox / "slide.ome.tif", slide, tile=(256, 256), ome=True, compression="zlib")
