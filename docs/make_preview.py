"""Makes docs/preview-coins.png: a preview written by the real daemon (``samwatch run --once``).

    PYTHONPATH=. .venv/bin/python docs/make_preview.py

MobileSAM (vit_t) with random weights (nothing can be downloaded where this was made), on
scikit-image's coins, with six box prompts in three classes and ``output.formats: [geojson,
labels]``. Random weights give speckled masks; real weights outline the coins.
"""

from __future__ import annotations

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


def main() -> None:
    from mobile_sam import build_sam_vit_t

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        torch.save(build_sam_vit_t().state_dict(), root / "vit_t.pt")
        (root / "inbox" / "exp1").mkdir(parents=True)
        Image.fromarray(data.coins()).save(root / "inbox" / "exp1" / "coins.png")
        boxes = [[10, 10, 95, 90], [95, 10, 165, 80], [175, 10, 250, 80], [20, 95, 90, 165], [235, 90, 310, 160],
                 [310, 150, 384, 230]]
        labels = ["silver", "silver", "bronze", "bronze", "worn", "worn"]
        sidecar = {"model": "vit_t", "prompts": [{"bbox": b, "label": c} for b, c in zip(boxes, labels)]}
        (root / "inbox" / "exp1" / "coins.yaml").write_text(yaml.safe_dump(sidecar))
        config = {"inbox": "inbox", "outbox": "outbox", "state_dir": "state", "device": "cpu",
                  "watch": {"mode": "polling", "settle_seconds": 0},
                  "weights": [{"name": "default", "type": "vit_t", "path": "vit_t.pt"}],
                  "output": {"formats": ["geojson", "labels"], "preview": True}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        subprocess.run([sys.executable, "-m", "samwatch", "run", "--once", "--config", str(root / "config.yaml")],
                       check=True)
        shutil.copy(root / "outbox" / "exp1" / "coins.preview.png", DOCS / "preview-coins.png")
        print(f"wrote {DOCS / 'preview-coins.png'}")


if __name__ == "__main__":
    main()
