"""Makes docs/preview-coins.png and docs/preview-qupath.png: previews written by the real daemon
(``samwatch run --once``).

    PYTHONPATH=. .venv/bin/python docs/make_preview.py

MobileSAM (vit_t) with random weights (nothing can be downloaded where this was made), on
scikit-image's coins. preview-coins: six box prompts in three classes in a sidecar, with
``output.formats: [geojson, labels]``. preview-qupath: the same coins as a QuPath 0.4 GeoJSON
export dropped beside the image (rectangles and a polygon in three classes, a point annotation,
an Ignore* background point), refined objects drawn in their QuPath class colours. Random
weights give speckled masks; real weights outline the coins.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from PIL import Image
from skimage import data

DOCS = Path(__file__).resolve().parent
BOXES = [[10, 10, 95, 90], [95, 10, 165, 80], [175, 10, 250, 80], [20, 95, 90, 165], [235, 90, 310, 160],
         [310, 150, 384, 230]]
LABELS = ["silver", "silver", "bronze", "bronze", "worn", "worn"]
QUPATH_COLOURS = {"silver": [190, 190, 210], "bronze": [205, 120, 40], "worn": [120, 200, 90],
                  "Ignore*": [180, 180, 180]}


def _run_once(root: Path, output: dict) -> None:
    torch.manual_seed(0)
    from mobile_sam import build_sam_vit_t

    torch.save(build_sam_vit_t().state_dict(), root / "vit_t.pt")
    config = {"inbox": "inbox", "outbox": "outbox", "state_dir": "state", "device": "cpu",
              "watch": {"mode": "polling", "settle_seconds": 0},
              "weights": [{"name": "default", "type": "vit_t", "path": "vit_t.pt"}], "output": output}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "samwatch", "run", "--once", "--config", str(root / "config.yaml")],
                   check=True)


def _feature(geometry: dict, name: str, index: int) -> dict:
    classification = {"name": name, "color": QUPATH_COLOURS[name]}
    return {"type": "Feature", "id": f"00000000-0000-0000-0000-{index:012d}", "geometry": geometry,
            "properties": {"objectType": "annotation", "classification": classification, "isLocked": False}}


def coins_sidecar(root: Path) -> Path:
    (root / "inbox" / "exp1").mkdir(parents=True)
    Image.fromarray(data.coins()).save(root / "inbox" / "exp1" / "coins.png")
    sidecar = {"model": "vit_t", "prompts": [{"bbox": b, "label": c} for b, c in zip(BOXES, LABELS)]}
    (root / "inbox" / "exp1" / "coins.yaml").write_text(yaml.safe_dump(sidecar))
    _run_once(root, {"formats": ["geojson", "labels"], "preview": True})
    return root / "outbox" / "exp1" / "coins.preview.png"


def coins_qupath_export(root: Path) -> Path:
    (root / "inbox").mkdir(parents=True)
    Image.fromarray(data.coins()).save(root / "inbox" / "coins.png")
    features = []
    for index, ((x1, y1, x2, y2), label) in enumerate(zip(BOXES[:5], LABELS)):
        ring = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
        features.append(_feature({"type": "Polygon", "coordinates": [ring]}, label, index))
    features.append(_feature({"type": "MultiPoint", "coordinates": [[345, 190]]}, "worn", 5))
    features.append(_feature({"type": "MultiPoint", "coordinates": [[372, 225]]}, "Ignore*", 6))
    (root / "inbox" / "coins.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    # Folder defaults are the settings of an export job: the smallest of SAM's three masks.
    defaults = {"model": "vit_t", "output_type": "Multi-mask (smallest)"}
    (root / "inbox" / "samwatch.yaml").write_text(yaml.safe_dump(defaults))
    _run_once(root, {"preview": True})
    return root / "outbox" / "coins.preview.png"


def main() -> None:
    for make, name in ((coins_sidecar, "preview-coins.png"), (coins_qupath_export, "preview-qupath.png")):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(make(Path(tmp)), DOCS / name)
        print(f"wrote {DOCS / name}")


if __name__ == "__main__":
    main()
