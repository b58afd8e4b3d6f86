"""The README's first hour through the real daemon: offline weights under their official URL,
OME-TIFF names, progress under ``--once``, status and history, previews, ``samwatch check``."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from samwatch.cli.main import main as cli
from samwatch.families import DEFAULT_WEIGHT_URLS
from samwatch.weights.registry import WeightsRegistry
from support import coins, fake_weights, read_json, save_image, write_config, write_sidecar

MOBILE_SAM_URL = DEFAULT_WEIGHT_URLS["vit_t"]


def run_once(config: Path, adapters=None) -> int:  # noqa: ANN001
    """``samwatch run --once`` in this process: the real command, daemon, threads and outbox;
    ``adapters``: the families table (None: the real models)."""
    return cli(["run", "--once", "--config", str(config)], adapters=adapters)


@pytest.fixture(autouse=True)
def logging_left_as_found():
    """``cli.main`` points loguru at this test's captured stderr: later tests must not write there."""
    import sys
    import warnings

    from loguru import logger

    shown = warnings.showwarning
    yield
    warnings.showwarning = shown
    logger.remove()
    logger.add(lambda message: sys.stderr.write(message))


@pytest.fixture
def fake_model():
    """The fake families table, for ``run_once``."""
    import fakes

    return fakes.fake_adapters


# -- 4. offline weights that keep their official URL --------------------------------------


def test_a_copied_file_registered_under_the_official_url_serves_model_vit_t_and_checkpoint_url(tmp_path, vit_t_checkpoint, capsys):
    config = write_config(tmp_path, [])
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    assert cli(["weights", "add", "mobile_sam", "vit_t", str(vit_t_checkpoint), "--url", MOBILE_SAM_URL,
                "--config", str(config)]) == 0
    sha = hashlib.sha256(vit_t_checkpoint.read_bytes()).hexdigest()
    entry = yaml.safe_load(config.read_text())["weights"][0]
    assert entry == {"name": "mobile_sam", "type": "vit_t", "url": MOBILE_SAM_URL, "sha256": sha}
    save_image(inbox / "my_cells.png", coins())
    # the README's first job: no weights named, so the type's default, i.e. the official URL
    write_sidecar(inbox / "my_cells.yaml", {"model": "vit_t", "label": "nucleus", "prompts": [{"bbox": [120, 80, 210, 170]}]})
    # a QuPath (samapi) body carrying the official URL
    write_sidecar(inbox / "my_cells.qupath.json", {"type": "vit_t", "bbox": [120, 80, 210, 170], "checkpoint_url": MOBILE_SAM_URL})

    assert run_once(config) == 0

    for stem in ("my_cells", "my_cells.qupath"):
        weights = read_json(outbox / f"{stem}.geojson")["samwatch"]["weights"]
        assert weights["sha256"] == sha, stem
    listed = capsys.readouterr()
    assert cli(["weights", "list", "--type", "vit_t", "--config", str(config), "--json"]) == 0
    items = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert items["default"]["state"] == items["mobile_sam"]["state"] == "ready"
    assert items["default"]["sha256"] == sha and listed is not None


def test_offline_weights_refused_when_they_are_not_what_the_url_or_type_says(tmp_path, vit_t_checkpoint, capsys):
    config = write_config(tmp_path, [])
    # a sha256 pinned for that URL (given, or in the config) that the file does not have
    assert cli(["weights", "add", "a", "vit_t", str(vit_t_checkpoint), "--url", MOBILE_SAM_URL,
                "--sha256", "0" * 64, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "weights_checksum_mismatch" in err and "without --url" in err
    assert not list((tmp_path / "state").rglob("*.pt"))
    # the official URL of another type
    assert cli(["weights", "add", "b", "vit_t", str(vit_t_checkpoint), "--url", DEFAULT_WEIGHT_URLS["vit_b"],
                "--config", str(config)]) == 2
    assert f"samwatch weights add b vit_b {vit_t_checkpoint}" in capsys.readouterr().err
    # a file of the wrong architecture for its type
    assert cli(["weights", "add", "c", "vit_b", str(vit_t_checkpoint), "--url", "https://example.org/c.pth",
                "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "weights_wrong_architecture" in err and "do not fit model type vit_b" in err
    assert "weights" not in yaml.safe_load(config.read_text()) or yaml.safe_load(config.read_text())["weights"] == []


def test_a_failed_download_names_the_config_in_use(tmp_path):
    from samwatch.config import WeightsEntry

    config_file = tmp_path / "etc" / "samwatch.yaml"
    entry = WeightsEntry(name="default", type="vit_t", url="http://127.0.0.1:9/mobile_sam.pt")
    registry = WeightsRegistry([entry], tmp_path / "state", config_file=config_file)
    try:
        with pytest.raises(Exception) as failed:
            registry.fetch("vit_t", "default")  # the daemon's and `weights fetch`'s path
        probed = registry.unobtainable("vit_t", "default")  # `samwatch check`'s
    finally:
        registry.close()
    advice = (f"samwatch weights add default vit_t /path/to/mobile_sam.pt --url http://127.0.0.1:9/mobile_sam.pt "
              f"--config {config_file}")
    assert failed.value.code == probed.code == "weights_download_failed"
    assert advice in failed.value.message and advice in probed.message


# -- 3. OME-TIFF names ---------------------------------------------------------------------


def test_ome_tiff_pairs_with_its_plain_stem_and_an_unknown_double_suffix_says_why(tmp_path, fake_model):
    import tifffile

    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    pixels = np.full((64, 80), 90, np.uint8)
    for name in ("a.ome.tif", "b.ome.tiff", "c.ome.tif", "d.v2.tif"):
        tifffile.imwrite(inbox / name, pixels, ome=name.endswith((".ome.tif", ".ome.tiff")))
    box = {"prompts": [{"bbox": [5, 5, 30, 30]}]}
    for sidecar in ("a.yaml", "b.yaml", "c.ome.yaml", "d.yaml"):
        write_sidecar(inbox / sidecar, box)

    assert run_once(config, fake_model) == 1

    for stem in ("a", "b", "c.ome"):
        assert (outbox / f"{stem}.geojson").is_file(), stem
    error = read_json(outbox / "d.error.json")
    assert error["error"] == "image_not_found"
    assert "there is d.v2.tif" in error["message"] and "d.v2.yaml" in error["message"]


# -- 5. progress under --once --------------------------------------------------------------


def test_progress_moves_under_once_as_under_run(tmp_path, fake_model, monkeypatch):
    from samwatch.control.outbox import Outbox

    seen: list[tuple[str, str, str, float]] = []
    original = Outbox.running

    def recording(self, job_id, stage, percent, message=""):  # noqa: ANN001
        seen.append((job_id, stage, message, time.monotonic()))
        original(self, job_id, stage, percent, message)

    monkeypatch.setattr(Outbox, "running", recording)
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox = tmp_path / "inbox"
    save_image(inbox / "small.png", np.full((64, 64), 80, np.uint8))
    write_sidecar(inbox / "small.yaml", {"label": "slow:1.2", "prompts": [{"bbox": [2, 2, 30, 30]}]})
    save_image(inbox / "large.png", np.full((1100, 1500), 80, np.uint8))
    write_sidecar(inbox / "large.yaml", {"label": "slow:0.6", "prompts": [{"bbox": [10, 10, 50, 50]},
                                                                         {"bbox": [1400, 1000, 1450, 1050]}]})

    assert run_once(config, fake_model) == 0

    small = [stage for job, stage, _, _ in seen if job == "small"]
    assert "reading" in small and "decoding prompts" in small
    loads = [message for job, stage, message, _ in seen if stage == "loading model"]
    assert "its first job here" in loads[0] and loads[-1] == ""  # the model stays loaded for the next job
    # written while the job ran, not all at once after it
    decoding = [at for job, stage, _, at in seen if job == "small" and stage == "decoding prompts"]
    assert decoding[-1] - decoding[0] >= 0.4
    assert [message for job, stage, message, _ in seen if job == "large" and stage == "tiles" and message.startswith("tile 1/2")]


# -- 6. status and history -----------------------------------------------------------------


def test_status_history_survives_restarts_once_per_job_and_a_fixed_failure_leaves(tmp_path, fake_model, capsys):
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    status_file = outbox / "_samwatch" / "status.json"
    save_image(inbox / "a.png", np.full((32, 32), 80, np.uint8))
    write_sidecar(inbox / "a.yaml", {"prompts": [{"bbox": [2, 2, 20, 20]}]})
    write_sidecar(inbox / "b.yaml", {"prompts": [{"bbox": [2, 2, 20, 20]}]})  # no image yet
    assert run_once(config, fake_model) == 1
    write_sidecar(inbox / "b.yaml", {"label": "again", "prompts": [{"bbox": [2, 2, 20, 20]}]})  # fails again
    assert run_once(config, fake_model) == 1
    assert run_once(config, fake_model) == 0  # a restart with nothing to do

    status = read_json(status_file)
    assert status["state"] == "stopped" and status["loaded_models"] == []
    assert all(worker["loaded_models"] == [] for worker in status["workers"])
    assert [f["job"] for f in status["recent_failures"]] == ["b"]
    assert status["recent_failures"][0]["error"] == "image_not_found" and status["recent_failures"][0]["message"]
    assert [r["job"] for r in status["recent_results"]] == ["a"]
    page = (outbox / "_samwatch" / "index.html").read_text()
    assert "<th>file</th>" in page and "<th></th>" not in page

    capsys.readouterr()
    assert cli(["status", "--outbox", str(outbox)]) in (0, 1)
    shown = capsys.readouterr().out
    assert "jobs: 1 done, 1 failed, 0 queued" in shown

    save_image(inbox / "b.png", np.full((32, 32), 80, np.uint8))  # fixed
    assert run_once(config, fake_model) == 0
    status = read_json(status_file)
    assert status["recent_failures"] == []
    assert [r["job"] for r in status["recent_results"]] == ["b", "a"]


# -- 7. previews people can read -----------------------------------------------------------


def test_previews_show_a_region_or_the_features_extent_with_the_prompts_drawn(tmp_path, fake_model):
    from PIL import Image

    from samwatch.outputs.preview import BOX_COLOR, POINT_COLORS
    from slides import dense_slide, write_ome_pyramid

    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    write_ome_pyramid(inbox / "s.ome.tif", dense_slide(2048, 3072), levels=3, tile=256)
    write_sidecar(inbox / "s.yaml", {"region": [1000, 500, 800, 400], "prompts": [
        {"bbox": [1100, 600, 1200, 700], "points": [[1150, 650]], "point_labels": [1]}]})
    write_sidecar(inbox / "s.spot.yaml", {"prompts": [{"bbox": [2000, 1500, 2060, 1560]}]})
    save_image(inbox / "plain.png", np.full((300, 400), 60, np.uint8))
    write_sidecar(inbox / "plain.yaml", {"prompts": [{"bbox": [50, 50, 150, 120], "points": [[100, 90], [60, 60]],
                                                      "point_labels": [1, 0]}]})

    assert run_once(config, fake_model) == 0

    def preview(stem: str) -> np.ndarray:
        return np.asarray(Image.open(outbox / f"{stem}.preview.png").convert("RGB"))

    def has(image: np.ndarray, color: tuple[int, int, int]) -> bool:
        return bool((image == np.array(color, np.uint8)).all(axis=-1).any())

    region = preview("s")
    assert region.shape[:2] == (400, 800)  # the region, at full resolution (never enlarged)
    spot = preview("s.spot")
    assert spot.shape[:2] == (188, 188)  # the feature (60 px) with its margin, not the 3072-px slide
    plain = preview("plain")
    assert plain.shape[:2] == (300, 400)  # an ordinary image: all of it
    for image in (region, spot, plain):
        assert has(image, BOX_COLOR)
    assert has(region, POINT_COLORS[1]) and has(plain, POINT_COLORS[1]) and has(plain, POINT_COLORS[0])


# -- 8. samwatch check reports every problem -----------------------------------------------


def test_check_reports_every_problem_beside_schema_errors_with_fixes(tmp_path, capsys):
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox = tmp_path / "inbox"
    save_image(inbox / "a.png", np.zeros((100, 120), np.uint8))
    (inbox / "a.yaml").write_text("lable: x\nprompts:\n  - bbox: [1, 2, 500, 60]\n  - bbox: [1, 2, 50]\n"
                                  "  - points: [[400, 10]]\n    lable: y\n")
    config.write_text(config.read_text() + "heartbeat_secnds: 3\n")
    assert cli(["check", "--config", str(config)]) == 2
    assert "heartbeat_secnds: unknown key" in capsys.readouterr().err
    config.write_text(config.read_text().replace("heartbeat_secnds: 3\n", ""))

    assert cli(["check", "--config", str(config)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "a.yaml: lable: sidecar_invalid: lable: unknown key; did you mean label?" in lines
    assert "a.yaml: prompts.2.lable: sidecar_invalid: prompts.2.lable: unknown key; did you mean label?" in lines
    assert "a.yaml: prompts.1.bbox: sidecar_invalid: prompts.1.bbox: bbox needs 4 numbers [x0, y0, x1, y1]" in lines
    # beside the schema errors, the boxes and points against the image
    assert any(line.startswith("a.yaml: prompts.0.bbox: prompt_out_of_bounds:") for line in lines), lines
    assert any(line.startswith("a.yaml: prompts.2.points.0: prompt_out_of_bounds:") for line in lines), lines
    assert len(lines) == 5, lines


# -- 9. admin details ----------------------------------------------------------------------


def test_tile_provenance_counts_add_up_when_an_embedding_is_reused_from_memory(tmp_path, vit_t_checkpoint):
    config = write_config(tmp_path, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}],
                          models={"accelerate": {"cpu": []}, "tile_embedding_cache_mb": 0})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    big = np.full((1100, 1500), 40, np.uint8)
    big[700:1003, 1000:1384] = coins()
    save_image(inbox / "mosaic.png", big)
    # two sidecars, one window each, the same window: the second reuses the first's embedding
    write_sidecar(inbox / "mosaic.yaml", {"prompts": [{"bbox": [1040, 740, 1120, 810]}]})
    write_sidecar(inbox / "mosaic.b.yaml", {"prompts": [{"bbox": [1050, 750, 1130, 820]}]})

    assert run_once(config) == 0

    tilings = [read_json(outbox / f"{stem}.geojson")["samwatch"]["tiling"] for stem in ("mosaic", "mosaic.b")]
    assert sorted((t["windows_encoded"], t["cache_hits"]) for t in tilings) == [(0, 1), (1, 0)]
    assert all(t["tiles"] == t["windows_encoded"] + t["cache_hits"] == 1 for t in tilings)


def test_the_start_line_names_each_kind_of_device_once_and_idle_dask_workers_their_device(tmp_path, fake_model, capsys):
    config = write_config(tmp_path, fake_weights(tmp_path), device=["cpu", "cpu"])
    assert run_once(config, fake_model) == 0
    started = [line for line in capsys.readouterr().err.splitlines() if " started inbox=" in line]
    assert started and " device=cpu watch=" in started[0], started

    distributed = pytest.importorskip("distributed")
    from samwatch.config_file import load_config
    from samwatch.executors.dask import DaskExecutor

    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as local, \
            distributed.Client(local) as client:
        executor = DaskExecutor(load_config(config), registry=None, client=client)
        assert [worker["device"] for worker in executor.workers()] == ["cpu"]  # before its first job


def test_weights_list_shows_the_sha256_the_daemon_computed(tmp_path, fake_model, capsys):
    config = write_config(tmp_path, fake_weights(tmp_path))
    save_image(tmp_path / "inbox" / "a.png", np.full((32, 32), 80, np.uint8))
    write_sidecar(tmp_path / "inbox" / "a.yaml", {"prompts": [{"bbox": [2, 2, 20, 20]}]})
    assert run_once(config, fake_model) == 0
    capsys.readouterr()
    assert cli(["weights", "list", "--type", "vit_t", "--json", "--config", str(config)]) == 0
    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listed["default"]["sha256"] == hashlib.sha256((tmp_path / "fake.pt").read_bytes()).hexdigest()
    (tmp_path / "fake.pt").write_bytes(b"other bytes")  # changed since: not shown as that sha256
    assert cli(["weights", "list", "--type", "vit_t", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["sha256"] is None
