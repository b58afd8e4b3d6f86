"""The watcher on the real file system, driven with an injected clock."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from samwatch.control.watcher import Watcher, choose_mode, mount_fs_type, needs_polling, scan_tree
from support import wait_for


def make(inbox: Path, mode: str = "polling", settle: float = 2.0) -> Watcher:
    return Watcher(inbox, mode=mode, settle_seconds=settle, poll_interval=1.0, rescan_interval=1000.0)


def test_files_settle_only_after_standing_still(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    watcher = make(tmp_path)
    assert watcher.poll(0.0) == (set(), set())
    assert watcher.poll(1.9) == (set(), set())
    assert watcher.poll(2.0)[0] == {"a.png"}
    assert watcher.poll(3.0) == (set(), set())  # reported once


def test_growing_file_is_never_settled(tmp_path: Path) -> None:
    target = tmp_path / "grow.tif"
    watcher = make(tmp_path)
    for step in range(10):
        with target.open("ab") as handle:
            handle.write(b"x" * 100)
        os.utime(target, ns=(step * 10**9, step * 10**9))
        changed, _ = watcher.poll(step * 1.0)
        assert "grow.tif" not in changed
    assert watcher.poll(20.0)[0] == {"grow.tif"}


def test_ignored_names_and_frames_folders(tmp_path: Path) -> None:
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "_done").mkdir()
    (tmp_path / "_done" / "a.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("{}")
    frames = tmp_path / "movie.frames"
    frames.mkdir()
    (frames / "f1.png").write_bytes(b"1")
    assert set(scan_tree(tmp_path)) == {"sub/b.yaml", "movie.frames"}
    watcher = make(tmp_path, settle=0.5)
    watcher.poll(0.0)
    assert watcher.poll(1.0)[0] == {"sub/b.yaml", "movie.frames"}
    (frames / "f2.png").write_bytes(b"22")  # a new frame changes the folder as a whole
    watcher._next_full_scan = 0  # force the next pass to rescan
    watcher.poll(2.0)
    assert "movie.frames" in watcher.pending
    assert watcher.poll(3.0)[0] == {"movie.frames"}


def test_vanished_files_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("{}")
    watcher = make(tmp_path, settle=0.0)
    assert watcher.poll(0.0)[0] == {"a.yaml"}
    (tmp_path / "a.yaml").unlink()
    watcher._next_full_scan = 0
    assert watcher.poll(1.0) == (set(), {"a.yaml"})


def test_native_events_and_polling_agree(tmp_path: Path) -> None:
    native = Watcher(tmp_path, mode="native", settle_seconds=0.2, poll_interval=1.0, rescan_interval=1000.0)
    polling = make(tmp_path, settle=0.2)
    try:
        start = time.monotonic()
        native.poll(start)
        polling.poll(start)
        (tmp_path / "deep" / "er").mkdir(parents=True)
        (tmp_path / "deep" / "er" / "x.png").write_bytes(b"abc")
        (tmp_path / "top.yaml").write_text("{}")
        seen_native: set[str] = set()

        def native_saw_both() -> bool:
            seen_native.update(native.poll(time.monotonic())[0])
            return {"deep/er/x.png", "top.yaml"} <= seen_native

        wait_for(native_saw_both, 10, what="native events")
        polling._next_full_scan = 0
        polling.poll(time.monotonic())
        polling.poll(time.monotonic() + 1)  # past settle_seconds: everything it saw settles
        assert set(native.settled) == set(polling.settled) == {"deep/er/x.png", "top.yaml"}
    finally:
        native.close()


def test_mount_detection(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export /srv/share nfs4 rw 0 0\n"
        "//nas/lab /mnt/lab cifs rw 0 0\n"
        "sshfs#u@h: /mnt/fuse fuse.sshfs rw 0 0\n"
    )
    assert mount_fs_type(Path("/srv/share/inbox"), mounts) == "nfs4"
    assert mount_fs_type(Path("/mnt/lab"), mounts) == "cifs"
    assert mount_fs_type(Path("/srv/shared"), mounts) == "ext4"
    assert needs_polling("nfs4") and needs_polling("cifs") and needs_polling("fuse.sshfs")
    assert not needs_polling("ext4") and not needs_polling(None)
    assert choose_mode("polling", tmp_path) == "polling"
    assert choose_mode("auto", tmp_path) in ("native", "polling")


@pytest.mark.parametrize("count", [10_000])
def test_polling_pass_over_many_files_is_cheap(tmp_path: Path, count: int) -> None:
    for folder in range(100):
        sub = tmp_path / f"d{folder:03d}"
        sub.mkdir()
        for index in range(count // 100):
            (sub / f"img{index:03d}.png").write_bytes(b"")
    watcher = make(tmp_path, settle=0.0)
    watcher.poll(0.0)
    watcher._next_full_scan = 0
    started = time.perf_counter()
    watcher.poll(1.0)
    elapsed = time.perf_counter() - started
    assert len(watcher.settled) == count
    assert elapsed < 2.0, f"a polling pass over {count} files took {elapsed:.2f} s"
