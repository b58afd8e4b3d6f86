"""The crash sweep's rig: the daemon in-process, stopped at an instant, and what a restart must find.

A kill -9 is simulated in-process: at the instant the disk is copied as it stands (the ledger
first, through SQLite's backup, then every other file: they only ever move ahead of the
ledger), the old daemon is abandoned, and a new one runs on the copy, so nothing the old
process would have done after the instant (a cleanup, an ``except`` that removes a temporary)
reaches what the new one sees. ``broken`` says what is wrong after the restart settled.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samwatch import faults
from samwatch.atomic import TMP_PREFIX
from samwatch.config import Config
from samwatch.control.daemon import Daemon
from samwatch.control.ledger import ACTIVE_STATES
from samwatch.processes import process_gone
from samwatch.vocab import WAITING_FOR_DEVICE
from fakes import fake_adapters
from support import fake_weights, read_json, save_image, write_sidecar

IMAGE = np.full((24, 32), 120, np.uint8)
#: the files of a done job (labels on, preview on) and of a failed one
DONE_FILES = (".geojson", ".preview.png", ".labels.tif", ".labels.csv", ".progress.json")
FAILED_FILES = (".error.json", ".progress.json")
Instant = tuple[str, str, int]  # instant, subject, its occurrence (1: the first time)
#: an instant of the dry run this run did not meet (threads interleave progress reports differently)
NOT_REACHED = "not reached"
WRITES = {"write 0%", "write 50%", "write 100%"}
#: the named instants of a done job's life (samwatch/faults.py), each met by the sweep
WHOLE_LIFE = {"queued", "reading", "loading model", "encoding image", "decoding prompts", "writing",
              *WRITES, "renamed", "recorded"}
#: a job refused when its sidecar is read
REFUSED = {"queued", "reading", *WRITES, "renamed", "recorded"}


#: seconds of the rig's clock between status.json writes (a step is 0.2)
STATUS_GAP = 2.0


class Clock:
    """The daemon's time: it moves only when a step is taken, so every run meets the same instants."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def jobs_for(inbox: Path, stems: list[str]) -> dict[str, str]:
    """Jobs ``stems`` (``bad*`` fails: its sidecar is refused when it runs); stem -> expected state."""
    expected = {}
    for stem in stems:
        save_image(inbox / f"{stem}.png", IMAGE)
        if stem.startswith("bad"):
            write_sidecar(inbox / f"{stem}.yaml", {"prompts": [{"bbox": [1, 1, 9, 9]}], "mask_choice": "twelve"})
            expected[stem] = "failed"
        else:
            write_sidecar(inbox / f"{stem}.yaml", {"prompts": [{"bbox": [1, 1, 9, 9]}, {"bbox": [12, 4, 30, 20]}]})
            expected[stem] = "done"
    return expected


def config_for(root: Path, depth: int, dask: str | None = None) -> Config:
    executor = {"pipeline_depth": depth} if dask is None else {"kind": "dask", "address": dask}
    return Config(
        inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state", device="cpu",
        watch={"mode": "polling", "settle_seconds": 0.0, "poll_interval_seconds": 0.1},
        service={"instance": "sweep", "heartbeat_seconds": 1000.0}, weights=fake_weights(root),
        executor=executor, output={"formats": ["geojson", "labels"]},
        models={"accelerate": {"cpu": []}},
    )


@dataclass(frozen=True)
class Setup:
    """How the daemon runs its jobs: inline (one at a time, inside ``step``), in pipelined slots
    (depth 3), or on a Dask cluster (``dask``: its scheduler's address)."""

    name: str
    threaded: bool
    dask: str | None = None


INLINE = Setup("inline", threaded=False)
PIPELINED = Setup("pipelined", threaded=True)


class Rig:
    """One daemon in-process over ``root``, run as ``setup`` says."""

    def __init__(self, root: Path, *, setup: Setup) -> None:
        self.root, self.threaded = root, setup.threaded or setup.dask is not None
        self.clock = Clock()
        # Held through each step: a job thread that meets its instant takes the crash image between
        # two steps, never while the loop is halfway through writing another job's outcome
        # (which a kill could not split as a copy taken meanwhile would: a result missing under
        # its final progress file and done marker).
        self.stepping = threading.RLock()
        config = config_for(root, 3 if setup.threaded else 1, setup.dask)
        # status.json is not a job's file (the sweep's instants leave it out): written every few steps, not each one
        self.daemon = Daemon.from_config(config, threaded=setup.threaded, clock=self.clock, adapters=fake_adapters,
                                         status_gap=STATUS_GAP)

    def step(self) -> None:
        with self.stepping:
            self.clock.now += 0.2
            self.daemon.step(self.clock.now)
            if self.threaded:
                self.daemon._collect(0.005)

    def crash_image(self, target: Path) -> None:
        """What a kill -9 now leaves, as ``crash_image``, the loop held between two steps."""
        held = self.stepping.acquire(timeout=10)
        try:
            crash_image(self.root, target)
        finally:
            if held:
                self.stepping.release()

    def idle(self) -> bool:
        daemon = self.daemon
        return (not daemon.dispatcher.running and not daemon.ledger.jobs_in(ACTIVE_STATES) and not daemon.watcher.pending
                and not daemon.facts.busy and not daemon.outbox.pending_writes)

    def run_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"the daemon over {self.root} did not settle"
            self.step()

    def close(self) -> None:
        faults.arm(None)
        self.daemon.close()


def record_instants(root: Path, stems: list[str], *, setup: Setup) -> list[Instant]:
    """The dry run: every instant the jobs meet, in order (job files only: not status.json)."""
    jobs_for(root / "inbox", stems)
    seen: list[Instant] = []
    counts: Counter = Counter()

    def record(instant: str, subject: str) -> None:
        if _ours(root, subject, stems):
            counts[instant, subject] += 1
            seen.append((instant, subject, counts[instant, subject]))

    rig = Rig(root, setup=setup)
    faults.arm(record)
    rig.run_until(lambda: rig.idle() and all_final(root, stems))
    rig.close()
    return [(instant, _relative(root, subject), n) for instant, subject, n in seen]


def _ours(root: Path, subject: str, stems: list[str]) -> bool:
    if subject in stems:
        return True
    path = Path(subject)
    return path.is_relative_to(root / "outbox") and not path.is_relative_to(root / "outbox" / "_samwatch")


def _relative(root: Path, subject: str) -> str:
    """A job file by its outbox path (the same in every run), anything else as it is."""
    path = Path(subject)
    return str(path.relative_to(root / "outbox")) if path.is_relative_to(root / "outbox") else subject


def all_final(root: Path, stems: list[str]) -> bool:
    return all((read_json(root / "outbox" / f"{s}.progress.json") or {}).get("state") in ("done", "failed") for s in stems)


def crash_image(source: Path, target: Path) -> None:
    """What a kill -9 at this instant leaves: the ledger's last commit, then the files as they stand."""
    (target / "state").mkdir(parents=True)
    with sqlite3.connect(source / "state" / "ledger.sqlite3") as live, sqlite3.connect(target / "state" / "ledger.sqlite3") as copy:
        live.backup(copy)
    live.close(), copy.close()
    for folder in ("state", "outbox", "inbox"):
        for dirpath, _, names in os.walk(source / folder):
            into = target / Path(dirpath).relative_to(source)
            into.mkdir(parents=True, exist_ok=True)
            for name in names:
                if name.startswith("ledger.sqlite3"):
                    continue
                try:
                    shutil.copy2(Path(dirpath, name), into / name)
                except FileNotFoundError:
                    pass  # renamed or removed as we copied: the copy is of an instant a moment later
    shutil.copy2(source / "fake.pt", target / "fake.pt")
    dead = dead_pid()
    for lock in (target / "outbox" / "_samwatch" / "claims").glob("*.lock"):  # the killed process's claims
        lock.write_text(lock.read_text().replace(f":{os.getpid()}\"", f":{dead}\""))


def dead_pid() -> int:
    """A pid no process has (the claims of a killed process name one)."""
    pid = 4_000_000
    while not process_gone(pid):
        pid += 1
    return pid


def ledger_states(root: Path) -> dict[str, str]:
    """The outcomes the ledger holds as written (not those whose files were kept in memory only)."""
    with sqlite3.connect(root / "state" / "ledger.sqlite3") as db:
        rows = dict(db.execute("SELECT job_id, state FROM jobs WHERE unwritten = 0").fetchall())
    db.close()
    return rows


def broken(root: Path, expected: dict[str, str], recorded: dict[str, str], started: Counter) -> list[str]:
    """What is wrong with the outbox after the restart settled (empty: exactly once)."""
    outbox, problems = root / "outbox", []
    leftovers = [str(p.relative_to(outbox)) for p in outbox.rglob(f"{TMP_PREFIX}*")]
    if leftovers:
        problems.append(f"temporaries left: {leftovers}")
    for stem, state in expected.items():
        progress = read_json(outbox / f"{stem}.progress.json") or {}
        if progress.get("state") != state:
            problems.append(f"{stem}: progress {progress.get('state')}/{progress.get('stage')}/{progress.get('percent')}")
        present = {suffix for suffix in (*DONE_FILES, *FAILED_FILES) if (outbox / f"{stem}{suffix}").exists()}
        wanted = set(DONE_FILES if state == "done" else FAILED_FILES)
        if present != wanted:
            problems.append(f"{stem}: files {sorted(present)}, expected {sorted(wanted)}")
        elif state == "done" and len((read_json(outbox / f"{stem}.geojson") or {}).get("features", [])) != 2:
            problems.append(f"{stem}: the result is not complete")
        if recorded.get(stem) in ("done", "failed") and started[stem]:
            problems.append(f"{stem}: recorded {recorded[stem]} before the crash, run again after it")
        if started[stem] > 1:
            problems.append(f"{stem}: run {started[stem]} times after the restart")
    return problems


def restart_and_check(root: Path, expected: dict[str, str], *, setup: Setup) -> list[str]:
    """A fresh daemon over ``root`` runs until all is settled; what is wrong then."""
    recorded = ledger_states(root)
    started: Counter = Counter()
    rig = Rig(root, setup=setup)
    faults.arm(lambda instant, subject: started.update([subject]) if instant == "queued" else None)
    try:
        rig.run_until(rig.idle)
        for _ in range(3):  # and stays so: nothing left that a later pass would do
            rig.step()
        rig.run_until(rig.idle)
    except AssertionError as exc:
        return [str(exc).splitlines()[0]]
    finally:
        rig.close()
    return broken(root, expected, recorded, started)


def crash_at(base: Path, stems: list[str], target: Instant, *, setup: Setup) -> list[str]:
    """kill -9 at ``target``, restart from what the disk held then: what is wrong afterwards."""
    live, image = base / "live", base / "after"
    expected = jobs_for(live / "inbox", stems)
    counts: Counter = Counter()
    taken: list[bool] = []

    def at(instant: str, subject: str) -> None:
        subject = _relative(live, subject)
        counts[instant, subject] += 1
        if not taken and (instant, subject, counts[instant, subject]) == target:
            rig.crash_image(image)
            taken.append(True)

    rig = Rig(live, setup=setup)
    faults.arm(at)
    try:
        rig.run_until(lambda: bool(taken) or (rig.idle() and all_final(live, stems)))
    finally:
        rig.close()  # abandoned: the copy is what the restart sees
    if not taken:
        return [NOT_REACHED]
    return restart_and_check(image, expected, setup=setup)


def sigterm_at(base: Path, stems: list[str], target: Instant, *, setup: Setup) -> list[str]:
    """SIGTERM at ``target`` with ``--grace 0`` (run_forever's stop), then a restart on the same folders."""
    expected = jobs_for(base / "inbox", stems)
    counts: Counter = Counter()
    rig = Rig(base, setup=setup)
    flags = rig.daemon.flags

    def at(instant: str, subject: str) -> None:
        subject = _relative(base, subject)
        counts[instant, subject] += 1
        if (instant, subject, counts[instant, subject]) == target:
            flags.stop = flags.stop_now = True  # what two signals' handler sets

    faults.arm(at)
    try:
        rig.run_until(lambda: flags.stop or (rig.idle() and all_final(base, stems)))
        rig.daemon._stop(0.0)
    finally:
        rig.close()
    return restart_and_check(base, expected, setup=setup)


def enospc_at(base: Path, stems: list[str], target: Instant, *, setup: Setup, then: str = "freed") -> list[str]:
    """The disk is full at ``target`` (a write): ``then`` freed at once (``freed``; ``freed, spool
    full``: the spool's write refused too, so the outcome waits in memory); or ``crash`` (killed
    once the outcome is recorded, the write still refused) with the spool on another disk, or
    with the spool's disk full too (``crash, spool full``). A restart follows in every case."""
    live, image = base / "live", base / "after"
    expected = jobs_for(live / "inbox", stems)
    job = target[1].split(".", 1)[0]
    counts: Counter = Counter()
    full, taken, spool_refused = [], [], []

    def at(instant: str, subject: str) -> None:
        relative = _relative(live, subject)
        counts[instant, relative] += 1
        if not full and (instant, relative, counts[instant, relative]) == target:
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device", subject)
        spool = Path(subject).is_relative_to(live / "state")
        if full and then == "freed, spool full" and spool and not spool_refused:
            spool_refused.append(True)
            raise OSError(errno.ENOSPC, "No space left on device", subject)
        if not full or then.startswith("freed"):
            return
        if instant == "write 50%" and (_ours(live, subject, stems) or (spool and then == "crash, spool full")):
            raise OSError(errno.ENOSPC, "No space left on device", subject)
        if instant == "recorded" and subject == job and not taken:
            rig.crash_image(image)
            taken.append(True)

    rig = Rig(live, setup=setup)
    faults.arm(at)
    try:
        rig.run_until(lambda: bool(taken) or (rig.idle() and all_final(live, stems)))
    finally:
        rig.close()
    if then.startswith("freed"):
        problems = broken(live, expected, {}, Counter())
        if set(ledger_states(live)) != set(stems):
            problems.append(f"outcomes still marked unwritten in the ledger: {set(stems) - set(ledger_states(live))}")
        return problems or restart_and_check(live, expected, setup=setup)
    return restart_and_check(image, expected, setup=setup) if taken else ["never recorded"]


def sweep(tmp_path: Path, stems: list[str], how: Callable[..., list[str]], *, setup: Setup,
          keep: Callable[[Instant], bool] = lambda _: True, life: set[str] = WHOLE_LIFE) -> None:
    instants = [i for i in record_instants(tmp_path / "dry", stems, setup=setup) if keep(i)]
    assert life <= {instant for instant, _, _ in instants}
    failures, missed = {}, []
    for index, target in enumerate(instants):
        case = tmp_path / f"case{index}"
        problems = how(case, stems, target, setup=setup)
        if problems == [NOT_REACHED]:
            missed.append(target)
        elif problems:
            failures[target] = problems
        if not problems:
            shutil.rmtree(case)
    report = "\n".join(f"{target}: {'; '.join(problems)}" for target, problems in failures.items())
    print(f"\n{how.__name__} {stems} {setup.name}: {len(instants)} instants, {len(failures)} broken, "
          f"{len(missed)} not reached {missed}")
    assert not failures, f"{len(failures)} of {len(instants)} instants broke exactly-once:\n{report}"
    # Threads interleave: how many progress reports a job's stages post varies a little from run to run,
    # and whether a job read ahead waits for the device at all.
    timing = [i for i in missed if i[1].endswith(".progress.json") or i[0] == WAITING_FOR_DEVICE]
    assert timing == missed and len(missed) <= len(instants) // 4, f"instants of the dry run not met again: {missed}"


def of_job(stem: str) -> Callable[[Instant], bool]:
    return lambda instant: instant[1] == stem or instant[1].startswith(f"{stem}.")


def writes(instant: Instant) -> bool:
    return instant[0] == "write 50%"


def outcome_writes(instant: Instant) -> bool:
    return writes(instant) and not instant[1].endswith(".progress.json")


