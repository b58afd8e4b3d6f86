"""Ledger, claims and systemd notify: the daemon's state, unit by unit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from samwatch.control.claims import ClaimStore
from samwatch.control.ledger import Ledger
from samwatch.control.notify import SystemdNotifier


def upsert(ledger: Ledger, job: str, version: str, priority: int = 0, grp: str = "") -> bool:
    return ledger.upsert(job, sidecar=f"{job}.yaml", image=f"{job}.png", image_sha="s", version=version, priority=priority, grp=grp)


def test_versions_decide_reruns(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert upsert(ledger, "a", "v1")
    assert not upsert(ledger, "a", "v1")
    row = ledger.next_job()
    ledger.start(row, "t")
    ledger.finish(row, "done")
    assert not upsert(ledger, "a", "v1")  # identical content: not again
    assert upsert(ledger, "a", "v2")
    assert ledger.get("a").state == "queued"


def test_a_new_version_while_running_stays_queued(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    upsert(ledger, "a", "v1")
    row = ledger.next_job()
    ledger.start(row, "t")
    upsert(ledger, "a", "v2")
    ledger.finish(row, "done")  # the outcome of v1 must not mark v2 done
    assert ledger.get("a").state == "queued" and ledger.get("a").version == "v2"


def test_restart_requeues_running_jobs(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    upsert(ledger, "a", "v1")
    ledger.start(ledger.next_job(), "t")
    ledger.close()
    again = Ledger(tmp_path / "l.db")
    assert again.recover() == 1
    assert again.get("a").state == "queued" and again.get("a").attempts == 1


def test_priority_then_fairness_between_folders(tmp_path: Path) -> None:
    clock = iter(range(1000))
    ledger = Ledger(tmp_path / "l.db", wallclock=lambda: float(next(clock)))
    for index in range(5):
        upsert(ledger, f"bulk/{index}", "v", grp="bulk")
    upsert(ledger, "person/one", "v", grp="person")
    upsert(ledger, "urgent/x", "v", priority=5, grp="urgent")
    order = []
    while (row := ledger.next_job()) is not None:
        ledger.start(row, "t")
        ledger.finish(row, "done")
        order.append(row.job_id)
    assert order[0] == "urgent/x"
    assert order.index("person/one") <= 2  # not after the whole bulk folder


def test_hash_cache(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    stamp = {"size": 10, "mtime_ns": 5, "ctime_ns": 7, "inode": 42}
    ledger.store_hash("a.png", "abc", **stamp)
    assert ledger.cached_hash("a.png", **stamp) == "abc"
    for changed in ({"mtime_ns": 6}, {"ctime_ns": 8}, {"inode": 43}, {"size": 11}):
        assert ledger.cached_hash("a.png", **{**stamp, **changed}) is None, changed


def test_a_ledger_from_before_ctime_and_inode_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "l.db")
    old.execute("CREATE TABLE file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)")
    old.execute("INSERT INTO file_hashes VALUES ('a.png', 10, 5, 'abc')")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.cached_hash("a.png", size=10, mtime_ns=5, ctime_ns=7, inode=42) is None  # hashed again
    ledger.store_hash("a.png", "def", size=10, mtime_ns=5, ctime_ns=7, inode=42)
    assert ledger.cached_hash("a.png", size=10, mtime_ns=5, ctime_ns=7, inode=42) == "def"


def test_claims_are_exclusive_and_expire(tmp_path: Path) -> None:
    now = [1000.0]
    one = ClaimStore(tmp_path, "one", ttl=60, wallclock=lambda: now[0])
    two = ClaimStore(tmp_path, "two", ttl=60, wallclock=lambda: now[0])
    assert one.try_claim("exp/a", "v" * 64)
    assert not two.try_claim("exp/a", "v" * 64)
    now[0] += 61
    lock = next(tmp_path.glob("*.lock"))
    os.utime(lock, (now[0] - 61, now[0] - 61))  # its owner stopped refreshing it
    assert two.try_claim("exp/a", "v" * 64)
    two.release("exp/a", "v" * 64, "done")
    assert one.finished_elsewhere("exp/a", "v" * 64) == "done"
    assert one.finished_elsewhere("exp/a", "w" * 64) is None
    assert list(tmp_path.glob("*.lock")) == []


def test_notify_speaks_systemds_protocol(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        assert notifier.enabled and notifier.watchdog_seconds == 30
        notifier.ready("idle")
        assert b"READY=1" in server.recv(4096)
        notifier.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
    finally:
        server.close()
    silent = SystemdNotifier({})
    assert not silent.enabled and silent.watchdog_seconds is None
    silent.ready("x")  # outside systemd: nothing happens, nothing fails
