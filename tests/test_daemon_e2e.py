"""The real daemon as a subprocess: drop files into the inbox, read the outbox."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import (
    DaemonProcess,
    coins,
    finished,
    progress_state,
    read_json,
    save_image,
    wait_for,
    write_config,
    write_sidecar,
)

pytestmark = pytest.mark.subprocess  # each test starts a real samwatch process

JOB_TIMEOUT = 120


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, vit_t_checkpoint: Path):
    """One daemon for the module: loading torch and the model once keeps the suite fast."""
    root = tmp_path_factory.mktemp("service")
    config = write_config(root, [{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    daemon = DaemonProcess(config)
    wait_for(lambda: (root / "outbox" / "_samwatch" / "status.json").exists(), 90, what="first heartbeat")
    yield root, daemon
    code = daemon.stop()
    assert code == 0, daemon.log()


def run_job(root: Path, stem: str, timeout: float = JOB_TIMEOUT) -> dict:
    outbox = root / "outbox"
    wait_for(lambda: finished(outbox, stem), timeout, what=f"{stem} to finish")
    return read_json(outbox / f"{stem}.progress.json")


def test_boxes_and_points_give_geojson(service) -> None:
    root, daemon = service
    inbox, outbox = root / "inbox", root / "outbox"
    save_image(inbox / "exp1" / "img001.png", coins())
    write_sidecar(inbox / "exp1" / "img001.yaml", {
        "model": "vit_t",
        "label": "nucleus",
        "prompts": [
            {"bbox": [40, 40, 120, 110]},
            {"points": [[200, 150], [10, 10]], "point_labels": [1, 0], "label": "cell"},
            {"bbox": [150, 50, 260, 160], "points": [[200, 100]]},
        ],
    })
    progress = run_job(root, "exp1/img001")
    assert progress["state"] == "done", (progress, daemon.log())
    result = read_json(outbox / "exp1" / "img001.geojson")
    assert result["type"] == "FeatureCollection"
    features = result["features"]
    assert {f["properties"]["prompt_idx"] for f in features} <= {0, 1, 2}
    assert [f["properties"]["object_idx"] for f in features] == list(range(len(features)))
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("nucleus", "cell")
        assert len(props["classification"]["color"]) == 3
        assert props["sam_model"] == "vit_t"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    meta = result["samwatch"]
    assert meta["model"] == "vit_t" and meta["weights"]["name"] == "default"
    assert len(meta["weights"]["sha256"]) == 64
    assert meta["image"]["width"] == 384 and meta["image"]["height"] == 303
    assert meta["device"] == "cpu" and meta["timings"]["total"] > 0
    assert not (outbox / "exp1" / "img001.error.json").exists()
    assert "job exp1/img001 done model=vit_t" in daemon.log()


def test_samapi_body_tagged_sidecar_and_folder_defaults(service) -> None:
    root, _ = service
    inbox, outbox = root / "inbox", root / "outbox"
    save_image(inbox / "exp2" / "a.png", coins())
    save_image(inbox / "exp2" / "sub" / "b.png", coins()[:200, :200])
    mask = np.zeros((303, 384), np.uint8)
    mask[60:120, 60:130] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    # A samapi /sam/ request body, saved as JSON minus b64img, as a tagged sidecar.
    write_sidecar(inbox / "exp2" / "a.cells.json", {
        "type": "vit_t", "bbox": [50, 50, 140, 130], "point_coords": [[90, 90]], "point_labels": [1],
        "b64mask": base64.b64encode(buffer.getvalue()).decode(), "multimask_output": True,
    })
    write_sidecar(inbox / "exp2" / "samwatch.yaml", {"model": "vit_t", "automask": {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}})
    progress = run_job(root, "exp2/a.cells")
    assert progress["state"] == "done", progress
    features = read_json(outbox / "exp2" / "a.cells.geojson")["features"]
    assert {f["properties"]["mask_idx"] for f in features} <= {0, 1, 2}
    assert len(features) >= 1
    # b.png has no sidecar of its own: the folder defaults above it apply (automask).
    assert run_job(root, "exp2/sub/b")["state"] == "done"
    # a.png is claimed by its tagged sidecar, so folder defaults do not make a second job:
    # a job dropped afterwards has run, so a.png's would have been seen by now.
    save_image(inbox / "exp2" / "later.png", coins())
    assert run_job(root, "exp2/later")["state"] == "done"
    assert not (outbox / "exp2" / "a.progress.json").exists()


BAD_INPUTS = {
    # name: (files to write, expected code, expected field or None)
    "yaml": ({"bad1.yaml": "model: vit_t\nprompts: [bbox: [1, 2\n"}, "sidecar_parse_error", None),
    "unknown_key": ({"bad2.yaml": "model: vit_t\nprompts: [{bbox: [1, 2, 30, 40]}]\ncolour: red\n"}, "sidecar_invalid", "colour"),
    "wrong_type": ({"bad3.yaml": "model: vit_t\nprompts: [{bbox: nope}]\n"}, "sidecar_invalid", "prompts.0.bbox"),
    "bbox_outside": ({"bad4.yaml": "model: vit_t\nprompts: [{bbox: [10, 10, 900, 40]}]\n"}, "prompt_out_of_bounds", "prompts.0.bbox"),
    "unknown_model": ({"bad5.yaml": "model: vit_q\nprompts: [{bbox: [1, 2, 30, 40]}]\n"}, "unknown_model", "model"),
    "unknown_weights": ({"bad6.yaml": "model: vit_t\nweights: nope\nprompts: [{bbox: [1, 2, 30, 40]}]\n"}, "unknown_weights", "weights"),
    "checkpoint_url": ({"bad7.json": json.dumps({"type": "vit_t", "bbox": [1, 2, 30, 40], "checkpoint_url": "http://x/y.pt"})}, "checkpoint_url_refused", "checkpoint_url"),
    "image_missing": ({"bad8.yaml": "model: vit_t\nimage: nothere.png\nprompts: [{bbox: [1, 2, 30, 40]}]\n"}, "image_not_found", "image"),
    "dotdot": ({"bad9.yaml": "image: ../../etc/passwd\nprompts: [{bbox: [1, 2, 30, 40]}]\n"}, "path_outside_inbox", "image"),
    "absolute": ({"bad10.yaml": "image: /etc/hostname\nprompts: [{bbox: [1, 2, 30, 40]}]\n"}, "path_outside_inbox", "image"),
    "mask_size": ({"bad11.yaml": "prompts: [{bbox: [1, 2, 30, 40], mask: bad11.mask.png}]\n"}, "mask_invalid", "prompts.0.mask"),
    "sidecar_too_large": ({"bad12.yaml": "label: " + "x" * 2_000_000 + "\n"}, "sidecar_too_large", None),
}


def test_bad_inputs_each_get_an_error_and_the_daemon_goes_on(service, tmp_path: Path) -> None:
    root, daemon = service
    inbox, outbox = root / "inbox", root / "outbox"
    folder = inbox / "bad"
    image = coins()
    for name, (files, _, _) in BAD_INPUTS.items():
        for file_name in files:
            stem = file_name.split(".")[0]
            if name not in ("image_missing", "dotdot", "absolute"):
                save_image(folder / f"{stem}.png", image)
    save_image(folder / "bad11.mask.png", np.zeros((17, 23), np.uint8))
    # Broken images and a link out of the inbox.
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.yaml").write_text("prompts: [{bbox: [1, 2, 30, 40]}]\n")
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    (folder / "trunc.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 3])
    (folder / "trunc.yaml").write_text("prompts: [{bbox: [1, 2, 30, 40]}]\n")
    (folder / "text.png").write_bytes(b"this is not an image at all")
    (folder / "text.yaml").write_text("prompts: [{bbox: [1, 2, 30, 40]}]\n")
    outside = tmp_path / "secret.png"
    save_image(outside, image)
    (folder / "link.png").symlink_to(outside)
    (folder / "linked.yaml").write_text("image: link.png\nprompts: [{bbox: [1, 2, 30, 40]}]\n")
    for name, (files, _, _) in BAD_INPUTS.items():
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
    expected = {file_name.split(".")[0]: (code, field) for files, code, field in BAD_INPUTS.values() for file_name in files}
    expected.update({
        "empty": ("image_unreadable", None), "trunc": ("image_unreadable", None),
        "text": ("image_unreadable", None), "linked": ("path_outside_inbox", "image"),
    })
    for stem, (code, field) in expected.items():
        wait_for(lambda: progress_state(outbox, f"bad/{stem}") == "failed", JOB_TIMEOUT, what=f"{stem} to fail")
        error = read_json(outbox / "bad" / f"{stem}.error.json")
        assert error["error"] == code, (stem, error)
        assert len(error["message"]) > 20 and error["message"].rstrip().endswith("."), error
        if field is not None:
            assert error.get("field") == field, (stem, error)
        assert not (outbox / "bad" / f"{stem}.geojson").exists()
    # The daemon is still alive and the next good job runs.
    save_image(inbox / "good" / "after.png", image)
    write_sidecar(inbox / "good" / "after.yaml", {"prompts": [{"bbox": [40, 40, 120, 110]}]})
    assert run_job(root, "good/after")["state"] == "done"
    assert daemon.alive()
    status = read_json(outbox / "_samwatch" / "status.json")
    assert {f["error"] for f in status["recent_failures"]} >= {"sidecar_parse_error", "image_unreadable"}


def test_image_too_thin_for_sam_gets_a_clear_code(service) -> None:
    root, daemon = service
    # One window that holds the whole strip (a larger image would be cut into windows SAM can take).
    save_image(root / "inbox" / "thin" / "strip.png", np.full((1, 3000), 90, np.uint8))
    write_sidecar(root / "inbox" / "thin" / "strip.yaml",
                  {"prompts": [{"bbox": [0, 0, 50, 1]}], "tiling": {"tile_size": 4096}})
    assert run_job(root, "thin/strip")["state"] == "failed"
    error = read_json(root / "outbox" / "thin" / "strip.error.json")
    assert error["error"] == "image_shape_unsupported" and "sam2" in error["message"], error
    assert daemon.alive()


def test_fixing_a_failed_job_removes_its_error(service) -> None:
    root, _ = service
    inbox, outbox = root / "inbox", root / "outbox"
    save_image(inbox / "fix" / "f.png", coins())
    (inbox / "fix" / "f.yaml").write_text("prompts: [{bbox: [1, 2, 3000, 40]}]\n")
    wait_for(lambda: (outbox / "fix" / "f.error.json").exists(), JOB_TIMEOUT, what="error")
    write_sidecar(inbox / "fix" / "f.yaml", {"prompts": [{"bbox": [1, 2, 30, 40]}]})
    # The result is renamed into place, then the error removed: wait for both.
    wait_for(lambda: (outbox / "fix" / "f.geojson").exists() and not (outbox / "fix" / "f.error.json").exists(),
             JOB_TIMEOUT, what="result without error")


def test_slow_writer_is_never_read_early(service) -> None:
    root, daemon = service
    inbox, outbox = root / "inbox", root / "outbox"
    png = io.BytesIO()
    Image.fromarray(coins()).save(png, format="PNG")
    data = png.getvalue()
    write_sidecar(inbox / "slow" / "s.yaml", {"image": "s.png", "prompts": [{"bbox": [40, 40, 120, 110]}]})
    wait_for(lambda: finished(outbox, "slow/s"), JOB_TIMEOUT, what="image_not_found for the missing image")
    target = inbox / "slow" / "s.png"
    with target.open("wb") as handle:  # final name from the start, growing for > settle time
        for start in range(0, len(data), len(data) // 8):
            handle.write(data[start : start + len(data) // 8])
            handle.flush()
            time.sleep(0.15)
            assert progress_state(outbox, "slow/s") != "running"
    wait_for(lambda: (outbox / "slow" / "s.geojson").exists(), JOB_TIMEOUT, what="result after the write ended")
    assert "job slow/s failed error=image_unreadable" not in daemon.log()


def test_identical_resave_does_not_rerun_and_change_does(service) -> None:
    root, daemon = service
    inbox, outbox = root / "inbox", root / "outbox"
    save_image(inbox / "rerun" / "r.png", coins())
    body = {"prompts": [{"bbox": [40, 40, 120, 110]}]}
    write_sidecar(inbox / "rerun" / "r.yaml", body)
    run_job(root, "rerun/r")
    first = (outbox / "rerun" / "r.geojson").stat().st_mtime_ns
    write_sidecar(inbox / "rerun" / "r.yaml", body)  # same bytes, new mtime
    # A job dropped after the re-save runs after anything the re-save would have queued.
    save_image(inbox / "rerun" / "s.png", coins())
    write_sidecar(inbox / "rerun" / "s.yaml", body)
    run_job(root, "rerun/s")
    assert (outbox / "rerun" / "r.geojson").stat().st_mtime_ns == first
    write_sidecar(inbox / "rerun" / "r.yaml", {"prompts": [{"bbox": [40, 40, 130, 120]}]})
    wait_for(lambda: (outbox / "rerun" / "r.geojson").stat().st_mtime_ns != first, JOB_TIMEOUT, what="re-run")
    wait_for(lambda: daemon.log().count("job rerun/r done") == 2, JOB_TIMEOUT, what="second run logged")


def test_deleting_a_queued_or_read_ahead_sidecar_cancels_it(service) -> None:
    root, _ = service
    inbox, outbox = root / "inbox", root / "outbox"
    # A long job holds the device; with executor.pipeline_depth 3 the slot reads two more jobs
    # ahead (they wait for the device) and the fourth waits in the daemon's queue.
    save_image(inbox / "busy" / "long.png", coins())
    write_sidecar(inbox / "busy" / "long.yaml", {"automask": {"points_per_side": 8, "points_per_batch": 4}})
    wait_for(lambda: progress_state(outbox, "busy/long") == "running", JOB_TIMEOUT, what="long job running")
    stems = [f"busy/z{index}" for index in range(3)]
    for stem in stems:
        save_image(inbox / f"{stem}.png", coins())
        write_sidecar(inbox / f"{stem}.yaml", {"prompts": [{"bbox": [40, 40, 120, 110]}]})

    def stages() -> dict[str, str] | None:
        progress = {stem: read_json(outbox / f"{stem}.progress.json") or {} for stem in stems}
        found = {stem: "queued" if p.get("state") == "queued" else p.get("stage") or "" for stem, p in progress.items()}
        return found if sorted(found.values()) == ["queued", "waiting for the device", "waiting for the device"] else None

    found = wait_for(stages, JOB_TIMEOUT, what="two jobs read ahead and one queued")
    queued = next(stem for stem, stage in found.items() if stage == "queued")
    waiting, kept = (stem for stem, stage in found.items() if stage != "queued")
    assert progress_state(outbox, "busy/long") == "running"
    for stem in (queued, waiting):
        (inbox / f"{stem}.yaml").unlink()
    for stem in (queued, waiting):
        wait_for(lambda stem=stem: progress_state(outbox, stem) == "cancelled", JOB_TIMEOUT, what=f"{stem} cancelled")
        assert not (outbox / f"{stem}.geojson").exists()
    wait_for(lambda: progress_state(outbox, kept) == "done", JOB_TIMEOUT, what="the job read ahead and kept")


def test_status_command_reads_the_heartbeat(service) -> None:
    import subprocess
    import sys

    root, _ = service
    result = subprocess.run(
        [sys.executable, "-m", "samwatch", "status", "--config", str(root / "config.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded models: vit_t/default" in result.stdout
    assert "device cpu" in result.stdout
