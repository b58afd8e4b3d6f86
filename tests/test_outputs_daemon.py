"""The real daemon (in-process, on the fake model) writes previews, label images and the dashboard
with its results, never a half-written file for a reader on another thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from support import InProcessDaemon, coins, fake_weights, finished, read_json, save_image, write_config, write_sidecar


class PollingReader(threading.Thread):
    """Reads the outbox as fast as it can, as a person's browser or a script on the share would."""

    def __init__(self, outbox: Path, stem: str) -> None:
        super().__init__(daemon=True)
        self.outbox, self.stem = outbox, stem
        self.stop = threading.Event()
        self.samples = {"page": 0, "result": 0}
        self.problems: list[str] = []

    def path(self, suffix: str) -> Path:
        return self.outbox / f"{self.stem}{suffix}"

    def run(self) -> None:
        while not self.stop.is_set():
            self.check_page()
            self.check_result()

    def check_page(self) -> None:
        try:
            page = (self.outbox / "_samwatch" / "index.html").read_text()
        except FileNotFoundError:
            return
        self.samples["page"] += 1
        if not (page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")):
            self.problems.append(f"half a page: {page[:40]!r}...{page[-40:]!r}")

    def check_result(self) -> None:
        extras = (".preview.png", ".labels.tif", ".labels.csv")
        try:
            before = self.path(".geojson").read_bytes()
            present = [self.path(suffix).exists() for suffix in extras]
            after = self.path(".geojson").read_bytes()
        except FileNotFoundError:
            return
        if before == after and not all(present):  # the same result before and after: its extras were there
            self.problems.append(f"a result without {[s for s, p in zip(extras, present) if not p]}")
        self.samples["result"] += 1
        try:
            with Image.open(self.path(".preview.png")) as image:
                image.load()
            tifffile.imread(self.path(".labels.tif"))
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a partial file was seen
            self.problems.append(f"half-written extra: {exc!r}")


def test_preview_labels_and_dashboard_appear_with_the_result(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path), output={"formats": ["geojson", "labels"]})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    save_image(inbox / "exp1" / "a.png", coins())
    reader = PollingReader(outbox, "exp1/a")
    daemon = InProcessDaemon(config)
    reader.start()
    try:
        boxes = [[20, 20, 110, 110], [120, 30, 200, 100], [210, 150, 300, 260]]
        for count in (3, 2, 3):
            write_sidecar(inbox / "exp1" / "a.yaml", {"label": "coin", "prompts": [{"bbox": b} for b in boxes[:count]]})
            daemon.run_until(lambda: (r := read_json(outbox / "exp1/a.geojson")) and len(r["features"]) == count
                     and finished(outbox, "exp1/a"), 30, what=f"the result with {count} features")
            labels = tifffile.imread(outbox / "exp1/a.labels.tif")
            assert labels.max() == count and len((outbox / "exp1/a.labels.csv").read_text().splitlines()) == count + 1
        assert labels.shape == coins().shape and sorted(np.unique(labels)) == [0, 1, 2, 3]
        with Image.open(outbox / "exp1/a.preview.png") as preview:
            assert preview.size == (384, 303)
        page = daemon.run_until(lambda: "exp1/a.preview.png" in (p := (outbox / "_samwatch/index.html").read_text()) and p,
                        10, what="the dashboard row")
        assert 'src="../exp1/a.preview.png"' in page and 'href="../exp1/a.labels.tif"' in page

        # An error replaces the result: its extras go with it, and the page drops the row.
        write_sidecar(inbox / "exp1" / "a.yaml", {"prompts": [{"bbox": [0, 0, 50, 10]}], "no_such_key": 1})
        daemon.run_until(lambda: (outbox / "exp1/a.error.json").exists() and finished(outbox, "exp1/a"), 30, what="the error")
        left = sorted(p.name for p in (outbox / "exp1").iterdir())
        assert left == ["a.error.json", "a.progress.json"]
        daemon.run_until(lambda: "a.preview.png" not in (outbox / "_samwatch/index.html").read_text(), 10,
                 what="the dashboard without the failed result")
        assert "sidecar_invalid" in (outbox / "_samwatch/index.html").read_text()
    finally:
        reader.stop.set()
        reader.join(10)
        daemon.close()
    assert not reader.problems, reader.problems[:5]
    assert reader.samples["page"] > 20 and reader.samples["result"] > 5, reader.samples
