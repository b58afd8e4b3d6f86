"""The outbox is someone else's disk: it fills, turns read-only, vanishes; the daemon goes on.

Through a running daemon on a small tmpfs outbox (we mount it: CI runs as root), filled and
freed, remounted read-only and writable again; plus the parts (the kept-write store, half-
written claims) in-process.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from samwatch.control.claims import ClaimStore
from samwatch.control.outbox import Outbox
from support import DaemonProcess, fake_weights, progress_state, read_json, save_image, wait_for, write_config, write_sidecar
from test_service import SMALL


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_outbox(tmp_path: Path):
    """A 2 MiB tmpfs mounted at tmp_path/outbox, unmounted afterwards."""
    mountpoint = tmp_path / "outbox"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mountpoint
    _mount("-o", "remount,rw", str(mountpoint))
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(folder: Path) -> Path:
    filler = folder / "_filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def job(inbox: Path, stem: str, label: str = "slow:1.5") -> None:
    save_image(inbox / f"{stem}.png", SMALL)
    write_sidecar(inbox / f"{stem}.yaml", {"label": label, "prompts": [{"bbox": [1, 1, 9, 9]}]})


def outbox_problem(outbox: Path) -> dict | None:
    return (read_json(outbox / "_samwatch" / "status.json") or {}).get("outbox", {}).get("problem")


@pytest.mark.subprocess
def test_full_and_read_only_outbox_mid_job_then_back(tmp_path: Path, small_outbox: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", small_outbox
    daemon = DaemonProcess(config, fake_model=True)
    # Full while a job runs: the job's outcome is kept, the daemon goes on.
    job(inbox, "full")
    wait_for(lambda: progress_state(outbox, "full") == "running", 60, what="job running")
    filler = fill(outbox)
    wait_for(lambda: "outbox write failed (ENOSPC" in daemon.log(), 60, what="ENOSPC reported")
    wait_for(lambda: "job full done" in daemon.log(), 60, what="job done while the disk is full")
    assert daemon.alive() and not (outbox / "full.geojson").exists()
    filler.unlink()
    wait_for(lambda: progress_state(outbox, "full") == "done" and (outbox / "full.geojson").exists(), 60, what="catch-up")
    wait_for(lambda: outbox_problem(outbox) is None and read_json(outbox / "_samwatch" / "status.json")["outbox"]["pending_writes"] == 0,
             30, what="status clear again")
    # Read-only while a job runs, then writable again.
    job(inbox, "ro")
    wait_for(lambda: progress_state(outbox, "ro") == "running", 60, what="second job running")
    assert _mount("-o", "remount,ro", str(outbox)).returncode == 0
    wait_for(lambda: "outbox write failed (EROFS" in daemon.log(), 60, what="EROFS reported")
    job(inbox, "during", label="fast")  # claims cannot be written: it waits, it is not lost
    wait_for(lambda: "job ro done" in daemon.log(), 60, what="job done on a read-only outbox")
    assert daemon.alive()
    assert _mount("-o", "remount,rw", str(outbox)).returncode == 0
    wait_for(lambda: progress_state(outbox, "ro") == "done" and (outbox / "ro.geojson").exists(), 60, what="catch-up after ro")
    wait_for(lambda: progress_state(outbox, "during") == "done", 60, what="job queued during the fault")
    wait_for(lambda: outbox_problem(outbox) is None, 60, what="status clear after ro")
    # Every job has exactly one outcome.
    log = daemon.log()
    assert [log.count(f"job {stem} done ") for stem in ("full", "ro", "during")] == [1, 1, 1]
    assert daemon.stop() == 0


@pytest.mark.subprocess
def test_removing_the_outbox_while_idle_does_not_wedge(tmp_path: Path) -> None:
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProcess(config, fake_model=True)
    job(inbox, "first", label="fast")
    wait_for(lambda: progress_state(outbox, "first") == "done", 30, what="first job")
    shutil.rmtree(outbox / "_samwatch", ignore_errors=True)  # the daemon may be writing status.json meanwhile
    job(inbox, "second", label="fast")
    wait_for(lambda: progress_state(outbox, "second") == "done", 30, what="job after rm -rf outbox/_samwatch")
    shutil.rmtree(outbox, ignore_errors=True)
    job(inbox, "third", label="fast")
    wait_for(lambda: progress_state(outbox, "third") == "done", 30, what="job after rm -rf outbox")
    wait_for(lambda: (outbox / "_samwatch" / "status.json").exists(), 30, what="status.json back")
    assert daemon.alive() and daemon.stop() == 0


@pytest.mark.parametrize("encoded", [False, True], ids=["dict", "encoded"])
def test_kept_writes_supersede_and_survive_a_restart(tmp_path: Path, encoded: bool) -> None:
    from samwatch.atomic import encoded_now

    now = [0.0]
    result = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [np.array([[0, 0], [1, 0], [1, 1], [0, 0]])]}, "properties": {}}]}
    root, spool = tmp_path / "outbox", tmp_path / "spool"
    root.write_text("not a folder")  # every write below it fails (mkdir: EEXIST), as on a broken share
    outbox = Outbox(root, spool=spool, clock=lambda: now[0])
    outbox.running("a", "decoding prompts", 50)
    outbox.done("a", encoded_now(result) if encoded else result, "1 features")
    assert outbox.pending_writes == 1 and outbox.problem["error"] == "EEXIST"
    again = Outbox(root, spool=spool, clock=lambda: now[0])  # a restart: the final write was spooled
    assert again.pending_writes == 1
    root.unlink()
    now[0] += 1.0
    again.retry()
    assert again.pending_writes == 0 and again.problem is None
    assert read_json(root / "a.progress.json")["state"] == "done"
    assert read_json(root / "a.geojson")["features"][0]["geometry"]["coordinates"] == [[[0, 0], [1, 0], [1, 1], [0, 0]]]
    assert list(spool.glob("*.json")) == []


def test_a_half_written_claim_is_replaced_at_once(tmp_path: Path) -> None:
    claims = ClaimStore(tmp_path, "one", ttl=120)
    version = "v" * 64
    assert claims.try_claim("job", version)
    lock = next(tmp_path.glob("*.lock"))
    lock.write_text("")  # what a full disk leaves: the name, not the content
    assert not ClaimStore(tmp_path, "two", ttl=120).try_claim("job", version)  # just written: not yet
    old = time.time() - 5
    os.utime(lock, (old, old))
    assert ClaimStore(tmp_path, "two", ttl=120).try_claim("job", version)  # long before the TTL
