"""Service figures: a polling pass over 10 000 files, and a burst of small jobs.

    python bench/bench_service.py [--files 10000] [--jobs 1000]

1. polling pass: time of one full scan of an inbox holding N files (nothing re-hashed), vs the
   poll interval it must stay well under (default 2 s), and a second pass when nothing changed.
2. burst: N one-box jobs dropped at once into a running daemon (the fake model family, so the
   figure is samwatch's own overhead per job: watching, ledger, claims, atomic outputs); jobs/s
   and the daemon's RSS before and after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from samwatch.control.watcher import Watcher  # noqa: E402
from support import DaemonProcess, fake_weights, finished, wait_for, write_config  # noqa: E402
from test_service import drop_jobs  # noqa: E402


def polling_pass(count: int, root: Path) -> None:
    for folder in range(count // 100):
        sub = root / f"d{folder:03d}"
        sub.mkdir(parents=True)
        for index in range(100):
            (sub / f"img{index:03d}.tif").write_bytes(b"")
            if index % 2 == 0:
                (sub / f"img{index:03d}.yaml").write_text("{}")
    total = len(list(root.rglob("*.*")))
    watcher = Watcher(root, mode="polling", settle_seconds=0, poll_interval=2.0, rescan_interval=2.0)
    started = time.perf_counter()
    watcher.poll(0.0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    watcher.poll(10.0)
    again = time.perf_counter() - started
    print(f"1. polling pass over {total} files: first {first * 1000:.0f} ms, unchanged {again * 1000:.0f} ms "
          f"= {again / 2.0:.1%} of a 2 s poll interval")


def burst(count: int, root: Path) -> None:
    config = write_config(root, fake_weights(root))
    daemon = DaemonProcess(config, fake_model=True)
    outbox = root / "outbox"
    warm = drop_jobs(root / "inbox", 20, folder="warm")
    wait_for(lambda: all(finished(outbox, s) for s in warm), 120)
    process = psutil.Process(daemon.proc.pid)
    before = process.memory_info().rss
    started = time.monotonic()
    stems = drop_jobs(root / "inbox", count)
    dropped = time.monotonic() - started
    wait_for(lambda: all(finished(outbox, s) for s in stems), 1800, interval=0.5)
    elapsed = time.monotonic() - started
    after = process.memory_info().rss
    daemon.stop()
    print(f"2. burst of {count} jobs: all done in {elapsed:.1f} s (dropping took {dropped:.1f} s) = "
          f"{count / elapsed:.1f} jobs/s; daemon RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB "
          f"({(after - before) / 1e6:+.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        polling_pass(args.files, Path(tmp) / "scan")
    with tempfile.TemporaryDirectory() as tmp:
        burst(args.jobs, Path(tmp))


if __name__ == "__main__":
    main()
