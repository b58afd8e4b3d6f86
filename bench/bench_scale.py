"""Scaling out: throughput on 1, 2, 4, 8 Dask workers and on 1 vs 2 local slots; the daemon's own
overhead per job; with --slurm, the daemon's own Slurm cluster (adapt max 1 vs 2); with --tiled,
one tiled job's tiles on a LocalCluster of 1 vs 2 workers.

    python bench/bench_scale.py [--jobs 200] [--seconds 0.1] [--workers 1 2 4 8]
    python bench/bench_scale.py --slurm [--jobs 12] [--seconds 3]   # needs .ci/slurm_up.sh (root)
    python bench/bench_scale.py --tiled [--seconds 0.2]             # 30 tiles of 0.2 s each

The daemon runs in this process (``Daemon.from_config``, the real watcher, ledger, claims and
outbox) and is stepped until every job is done. The model is the fake family (tests/fakes.py)
with a fixed per-job time that *sleeps* (``slow:N``), so on a 2-core machine the workers do not
compete for CPU and the figure is the scheduling, not the arithmetic. Dask workers are threads of
one LocalCluster process (processes=False) for the same reason. Ratios are against one worker
(goal: ≥ 0.8·N) and one local slot. Overhead: the daemon's time per job from the settled files to
``executor.submit`` (hashing, ledger, claim, progress write) and from the outcome to its files
(ledger, result, progress, claim marker); goal < 20 ms each.

--slurm: the daemon starts a dask-jobqueue SLURMCluster (1 core per worker job, adapt 0..N) on the
local Slurm; its workers are Slurm jobs preloading the fake model (tests/fake_worker.py). Each run
starts cold (no worker job); "first result" is the time from the first dispatch to the first
result file, the cold start of a worker job included; jobs/s is over the whole run and, "steady",
from the first result to the last.

--tiled: one automask job on a 1300 x 1000 image in tiles of 256 (6 x 5 = 30 tiles), each tile
sleeping ``--seconds``. On one worker (one thread) the tiles run in the job's own thread; on two,
the job sends them to both workers (executors/dask_units.py). Ideal ratio 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fakes  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from samwatch.config import Config  # noqa: E402
from samwatch.control.daemon import Daemon  # noqa: E402
from support import fake_weights, save_image, write_sidecar  # noqa: E402



def make_inbox(root: Path, count: int, seconds: float) -> Path:
    inbox = root / "inbox"
    image = np.full((48, 64), 120, np.uint8)
    for index in range(count):
        save_image(inbox / f"b/j{index:04d}.png", image)
        write_sidecar(inbox / f"b/j{index:04d}.yaml", {"label": f"slow:{seconds}", "prompts": [{"bbox": [1, 1, 9, 9]}]})
    return inbox


class Timed:
    """Wraps a bound method, adding up the seconds spent in it."""

    def __init__(self, method) -> None:  # noqa: ANN001
        self.method, self.seconds = method, 0.0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        started = time.perf_counter()
        try:
            return self.method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def run(root: Path, inbox: Path, count: int, name: str, **overrides) -> dict[str, float]:  # noqa: ANN003
    work = root / name
    config = Config(
        inbox=inbox, outbox=work / "outbox", state_dir=work / "state", weights=fake_weights(root), log_level="WARNING",
        watch={"mode": "polling", "settle_seconds": 0.0, "poll_interval_seconds": 0.05},
        service={"instance": name, "heartbeat_seconds": 1.0}, **overrides,
    )
    daemon = Daemon.from_config(config, adapters=fakes.fake_adapters)
    discover = daemon.queue.discover = Timed(daemon.queue.discover)
    start = daemon.dispatcher.start = Timed(daemon.dispatcher.start)
    picks = daemon.queue.next_ready = Timed(daemon.queue.next_ready)
    record = daemon.recorder.record = Timed(daemon.recorder.record)
    submit = daemon.executor.submit = Timed(daemon.executor.submit)
    first = first_done = None
    try:
        while daemon.recorder.stats.done < count:
            daemon.step(time.monotonic())
            if first is None and daemon.dispatcher.running:
                first = time.perf_counter()
            daemon._collect(0.01)
            if first_done is None and daemon.recorder.stats.done:
                first_done = time.perf_counter()
        end = time.perf_counter()
        wall = end - first
    finally:
        daemon.close()
    return {
        "wall": wall, "jobs_per_s": count / wall, "first_result_s": first_done - first,
        "steady_jobs_per_s": (count - 1) / (end - first_done) if count > 1 and end > first_done else float("nan"),
        "to_submit_ms": 1000 * (discover.seconds + picks.seconds + start.seconds - submit.seconds) / count,
        "to_file_ms": 1000 * record.seconds / count,
    }


def slurm_cluster(maximum: int) -> dict:  # noqa: ANN201
    return {"kind": "dask", "cluster": {
        "kind": "slurm", "queue": "ci", "cores": 1, "memory": "2GB", "walltime": "00:30:00",
        "adapt_minimum": 0, "adapt_maximum": maximum, "python": sys.executable,
        "env": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
                "DASK_DISTRIBUTED__WORKER__PRELOAD": "['fake_worker']"},
    }}


def bench_slurm(args: argparse.Namespace) -> None:
    import os
    import subprocess

    up = subprocess.run([str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(f"no local Slurm: {up.stderr.strip()}")
    os.environ["SLURM_CONF"] = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    with tempfile.TemporaryDirectory(prefix="bench-slurm-", dir=args.root) as tmp:
        root = Path(tmp)
        inbox = make_inbox(root, args.jobs, args.seconds)
        print(f"{args.jobs} jobs of {args.seconds} s (sleeping fake model) on the local Slurm, 1 core per worker job")
        runs = {maximum: run(root, inbox, args.jobs, f"slurm{maximum}", executor=slurm_cluster(maximum)) for maximum in (1, 2)}
        for maximum, figures in runs.items():
            print(f"adapt max {maximum}: {figures['jobs_per_s']:5.2f} jobs/s over {figures['wall']:.1f} s "
                  f"(steady {figures['steady_jobs_per_s']:.2f} jobs/s), first result {figures['first_result_s']:.1f} s "
                  f"after the first dispatch (cold cluster)")
        print(f"adapt max 2 / max 1: {runs[2]['jobs_per_s'] / runs[1]['jobs_per_s']:.2f}x overall, "
              f"{runs[2]['steady_jobs_per_s'] / runs[1]['steady_jobs_per_s']:.2f}x steady (ideal 2)")


@contextmanager
def dask_cluster(workers: int):  # noqa: ANN201
    """The executor block of a LocalCluster of ``workers`` one-thread workers in this process, the
    daemon's DaskExecutor handed that cluster's client."""
    from distributed import Client, LocalCluster

    from samwatch.executors.dask import DaskExecutor

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for worker in cluster.workers.values():
            fakes.dask_setup(worker)  # the fake model family in each worker's pool
        with Client(cluster) as client:
            original = DaskExecutor.__init__

            def with_client(self, config, registry, *, client=client):  # noqa: ANN001, ANN202
                original(self, config, registry, client=client)

            DaskExecutor.__init__ = with_client
            try:
                yield {"kind": "dask", "address": cluster.scheduler_address}
            finally:
                DaskExecutor.__init__ = original


def bench_tiled(args: argparse.Namespace) -> None:
    import json

    with tempfile.TemporaryDirectory(prefix="bench-tiled-", dir=args.root) as tmp:
        root = Path(tmp)
        save_image(root / "inbox" / "big.png", np.zeros((1000, 1300, 3), np.uint8))
        write_sidecar(root / "inbox" / "big.yaml", {"label": f"slow:{args.seconds}", "tiling": {"tile_size": 256, "overlap": 32}})
        print(f"one tiled job: 30 tiles of {args.seconds} s (sleeping fake model)")
        runs = {}
        for workers in (1, 2):
            with dask_cluster(workers) as executor:
                runs[workers] = run(root, root / "inbox", 1, f"tiled{workers}", executor=executor)
            tiling = json.loads((root / f"tiled{workers}" / "outbox" / "big.geojson").read_text())["samwatch"]["tiling"]
            print(f"{workers} worker(s): {runs[workers]['wall']:.1f} s, tiles {tiling['tiles']}, "
                  f"on {tiling.get('tile_workers', 'the job thread')}")
        print(f"2 workers / 1: {runs[1]['wall'] / runs[2]['wall']:.2f}x faster (ideal 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=0.1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--root", type=Path, default=None,
                        help="folder for inbox/outbox/state (e.g. /dev/shm: the daemon's CPU cost without the disk's fsyncs)")
    parser.add_argument("--slurm", action="store_true", help="adapt max 1 vs 2 on the local Slurm (.ci/slurm_up.sh)")
    parser.add_argument("--tiled", action="store_true", help="one tiled job on a LocalCluster of 1 vs 2 workers")
    args = parser.parse_args()
    if args.slurm:
        args.jobs = 12 if args.jobs == parser.get_default("jobs") else args.jobs
        args.seconds = 3.0 if args.seconds == parser.get_default("seconds") else args.seconds
        bench_slurm(args)
        return
    if args.tiled:
        args.seconds = 0.2 if args.seconds == parser.get_default("seconds") else args.seconds
        bench_tiled(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.root) as tmp:
        root = Path(tmp)
        inbox = make_inbox(root, args.jobs, args.seconds)
        print(f"{args.jobs} jobs of {args.seconds} s (sleeping fake model)")
        local = {slots: run(root, inbox, args.jobs, f"local{slots}", device=["cpu"] * slots) for slots in (1, 2)}
        for slots, figures in local.items():
            print(f"local {slots} slot(s): {figures['jobs_per_s']:6.1f} jobs/s  ({figures['wall']:.1f} s)  "
                  f"overhead: settled->submitted {figures['to_submit_ms']:.1f} ms, outcome->files {figures['to_file_ms']:.1f} ms")
        print(f"local 2 slots / 1 slot: {local[2]['jobs_per_s'] / local[1]['jobs_per_s']:.2f}x (ideal 2)")
        dask: dict[int, dict[str, float]] = {}
        for workers in args.workers:
            with dask_cluster(workers) as executor:
                dask[workers] = run(root, inbox, args.jobs, f"dask{workers}", executor=executor)
            figures = dask[workers]
            ratio = figures["jobs_per_s"] / dask[args.workers[0]]["jobs_per_s"]
            print(f"dask {workers} worker(s): {figures['jobs_per_s']:6.1f} jobs/s  ({figures['wall']:.1f} s)  "
                  f"{ratio:.2f}x one worker (goal >= {0.8 * workers / args.workers[0]:.1f})  "
                  f"overhead: {figures['to_submit_ms']:.1f} ms + {figures['to_file_ms']:.1f} ms")


if __name__ == "__main__":
    main()
