"""The daemon's heartbeat while a huge sidecar and a huge image arrive.

    python bench/bench_loop_latency.py [--prompts 40000] [--image-gib 4] [--idle 10]

Runs ``samwatch run`` as a subprocess with the fake model family (tests/fakes.py: the model is
not what is measured) and samples ``_samwatch/status.json`` every 20 ms. Baseline: the longest
gap between two heartbeats while idle for ``--idle`` seconds, in the same run. Then a legal
YAML sidecar of ``--prompts`` box prompts (~22 bytes each: 40 000 is ~860 KB) and a sparse
``--image-gib`` GiB image with its own sidecar arrive together; reported are the longest gaps
until both jobs are queued (arrival: parsing and hashing) and until both have finished.
Goal: under 2 s (the heartbeat beats every 0.5 s). Before parsing and hashing left the loop
thread: 23 s for the sidecar alone (parsed twice by pure-Python PyYAML), 11 s for the image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support import (  # noqa: E402
    DaemonProcess, HeartbeatGaps, fake_weights, finished, read_json, wait_for, write_config,
)


def phase(beats: HeartbeatGaps, until, timeout: float) -> float:  # noqa: ANN001
    """The longest heartbeat gap until ``until()`` holds."""
    beats.longest = 0.0
    wait_for(lambda: (beats.sample(), until())[1], timeout, what="the phase to end", interval=0.02)
    return beats.longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40_000)
    parser.add_argument("--image-gib", type=float, default=4)
    parser.add_argument("--idle", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        root = Path(tmp)
        config = write_config(root, fake_weights(root), limits={"max_image_bytes": 16 * 2**30})
        daemon = DaemonProcess(config, fake_model=True)
        try:
            inbox, outbox = root / "inbox", root / "outbox"
            beats = HeartbeatGaps(outbox / "_samwatch" / "status.json")
            wait_for(lambda: beats.status.exists(), 90, what="first heartbeat")
            end = time.monotonic() + args.idle
            idle = phase(beats, lambda: time.monotonic() > end, args.idle + 5)

            small = np.full((48, 64), 120, np.uint8)
            Image.fromarray(small).save(inbox / "many.png")
            Image.fromarray(small).save(inbox / "huge.png")
            with (inbox / "huge.png").open("r+b") as handle:
                handle.truncate(int(args.image_gib * 2**30))  # sparse: every byte hashed, none on disk
            (inbox / "huge.yaml").write_text("prompts:\n- {bbox: [1, 1, 10, 10]}\n")
            lines = [f"- bbox: [{i % 50},{i % 40},{i % 50 + 4},{i % 40 + 3}]" for i in range(args.prompts)]
            sidecar = "prompts:\n" + "\n".join(lines) + "\n"
            (inbox / ".many.yaml.tmp").write_text(sidecar)
            (inbox / ".many.yaml.tmp").rename(inbox / "many.yaml")
            started = time.monotonic()

            def queued() -> bool:
                return all((outbox / f"{stem}.progress.json").exists() for stem in ("many", "huge"))

            arrival = phase(beats, queued, 600)
            arrival_s = time.monotonic() - started
            run = phase(beats, lambda: finished(outbox, "many") and finished(outbox, "huge"), 1200)
            states = {stem: (read_json(outbox / f"{stem}.progress.json") or {}).get("state") for stem in ("many", "huge")}
        finally:
            daemon.stop()
    print(f"sidecar: {args.prompts} prompts, {len(sidecar.encode()) / 1000:.0f} KB; image: {args.image_gib} GiB sparse")
    print(f"longest heartbeat gap idle ({args.idle:.0f} s):            {idle:6.2f} s")
    print(f"longest heartbeat gap while they arrive ({arrival_s:.1f} s): {arrival:6.2f} s  (x{arrival / idle:.1f} idle; goal < 2 s)")
    print(f"longest heartbeat gap until both finished:      {run:6.2f} s  (x{run / idle:.1f} idle); outcomes {states}")


if __name__ == "__main__":
    main()
