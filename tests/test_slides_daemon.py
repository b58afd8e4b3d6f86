"""Slides through the running daemon: each bad slide gets its error file, and the daemon goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from slides import corrupt_tile, dense_slide, truncate, write_ome_pyramid, write_svs
from support import DaemonProcess, fake_weights, progress_state, read_json, wait_for, write_config, write_sidecar

pytestmark = pytest.mark.subprocess  # each test starts a real samwatch process

JOB_TIMEOUT = 60
PROMPT = {"prompts": [{"bbox": [40, 40, 300, 200]}]}


@pytest.fixture
def daemon(tmp_path: Path):
    # 1536 x 1024 slides fit; a 2048 x 2048 one is over the slide limit.
    config = write_config(tmp_path, fake_weights(tmp_path), limits={"max_slide_pixels": 2_000_000})
    process = DaemonProcess(config, fake_model=True)
    yield tmp_path, process
    assert process.stop() == 0, process.log()


def test_bad_slides_each_get_an_error_and_a_good_slide_after_them_runs(daemon):
    root, process = daemon
    inbox, outbox = root / "inbox", root / "outbox"
    content = dense_slide(1024, 1536)
    slides = inbox / "slides"
    slides.mkdir()

    corrupt = write_ome_pyramid(slides / "corrupt.tif", content, levels=2)
    corrupt_tile(corrupt, tile=0)
    truncate(write_ome_pyramid(slides / "cut.tif", content, levels=2), 0.6)
    truncate(write_svs(slides / "cutsvs.svs", content, levels=2), 0.9)
    (slides / "olympus.vsi").write_bytes(b"\0" * 4096)
    tifffile.imwrite(slides / "stripped.svs", np.zeros((64, 64), np.uint8))
    (slides / "noise.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    write_ome_pyramid(slides / "huge.tif", dense_slide(2048, 2048), levels=2)
    expected = {
        "corrupt": "slide_tile_corrupt", "cut": "slide_truncated", "cutsvs": "slide_truncated",
        "olympus": "slide_format_unsupported", "stripped": "slide_format_unsupported",
        "noise": "image_unreadable", "huge": "slide_too_large",
    }
    for stem in expected:
        write_sidecar(slides / f"{stem}.yaml", PROMPT)
    for stem, code in expected.items():
        wait_for(lambda: progress_state(outbox, f"slides/{stem}") == "failed", JOB_TIMEOUT, what=f"{stem} to fail")
        error = read_json(outbox / "slides" / f"{stem}.error.json")
        assert error["error"] == code, (stem, error)
        assert error["message"].rstrip().endswith("."), error
        assert not (outbox / "slides" / f"{stem}.geojson").exists()

    assert process.alive()
    write_svs(slides / "good.svs", content, levels=2)
    write_ome_pyramid(slides / "good2.tif", content, levels=2)
    for stem in ("good", "good2"):
        write_sidecar(slides / f"{stem}.yaml", PROMPT)
    for stem in ("good", "good2"):
        wait_for(lambda: progress_state(outbox, f"slides/{stem}") == "done", JOB_TIMEOUT, what=f"{stem} to finish")
        result = read_json(outbox / "slides" / f"{stem}.geojson")
        assert result["samwatch"]["image"]["width"] == 1536
        assert result["samwatch"]["image"]["slide"]["levels"] == [[1536, 1024, 1.0], [768, 512, 2.0]]
        assert len(result["features"]) == 1
