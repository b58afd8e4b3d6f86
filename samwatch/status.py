"""What the daemon tells people: ``_samwatch/status.json``, the systemd status line, the watchdog.

status.json is rewritten on every heartbeat and whenever a job changes state, so ``samwatch
status`` never lags the job files by a beat. Its keys are documented in README.md (Status).
A daemon that stops cleanly leaves ``"state": "stopped"``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from samwatch import __version__
from samwatch.atomic import now_iso
from samwatch.outputs.dashboard import PAGE, dashboard_page
from samwatch.vocab import WAITING_FOR_DEVICE

if TYPE_CHECKING:
    from samwatch.daemon import Daemon


class StatusReporter:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.started_at = now_iso()

    def state(self, *, stopped: bool = False) -> str:
        daemon = self.daemon
        if stopped:
            return "stopped"
        if daemon.flags.stop:
            return "stopping"
        return "running" if daemon.dispatcher.running else "idle"

    def running_jobs(self) -> list[dict[str, Any]]:
        daemon = self.daemon
        now = daemon.clock()
        where = {job: worker.get("name") for worker in daemon.workers for job in worker.get("jobs") or [worker.get("job")] if job}
        return [
            {
                "job": run.ticket.job_id,
                "stage": run.stage,
                "percent": round(run.percent),
                "seconds": round(now - run.started, 1),
                "worker": where.get(run.ticket.job_id),
            }
            for run in daemon.dispatcher.running.values()
        ]

    def payload(self, *, stopped: bool = False) -> dict[str, Any]:
        daemon = self.daemon
        counts = daemon.ledger.counts()
        stats = daemon.recorder.stats
        running = self.running_jobs()
        workers = daemon.workers
        return {
            "state": self.state(stopped=stopped),
            "version": __version__,
            "instance": daemon.config.service.instance,
            "pid": os.getpid(),
            "started": self.started_at,
            "updated": now_iso(),
            "heartbeat_seconds": daemon.config.service.heartbeat_seconds,
            "device": ", ".join(dict.fromkeys(worker["device"] for worker in workers)) or "none",
            "executor": {"kind": daemon.executor.kind, "slots": len(workers)},
            "workers": workers,
            "watch_mode": daemon.watcher.mode,
            "inbox": str(daemon.config.inbox),
            "queue": {"queued": counts.get("queued", 0), "waiting": counts.get("waiting", 0)},
            "totals": {**counts, "done_this_run": stats.done, "failed_this_run": stats.failed},
            "running": running,
            "current": running[0] if running else None,
            "loaded_models": _distinct(model for worker in workers for model in worker.get("loaded_models", [])),
            "downloads": [item for item in daemon.registry.listing() if item.get("state") == "downloading"],
            "recent_failures": list(stats.recent_failures),
            "recent_results": stats.recent_results.listing(),
            "skipped_inputs": dict(daemon.watcher.skipped),  # inbox entries no job can be made of, with why
            "config": {"path": str(daemon.config_path) if daemon.config_path else None, "error": daemon.config_error},
            "outbox": {"problem": daemon.outbox.problem, "pending_writes": daemon.outbox.pending_writes},
        }

    def line(self) -> str:
        daemon = self.daemon
        counts = daemon.ledger.counts()
        stats = daemon.recorder.stats
        running = self.running_jobs()
        current = "; ".join(f"running {job['job']} {job['percent']}%" for job in running) or "idle"
        return f"{current}; queued {counts.get('queued', 0)}, done {stats.done}, failed {stats.failed}"

    def job_stalled(self) -> bool:
        """A running job without progress for ``job_stall_seconds``: the watchdog stops being fed.
        A job read ahead, waiting for the device, is not stalled: the job on the device is judged."""
        daemon = self.daemon
        limit = daemon.config.service.job_stall_seconds
        now = daemon.clock()
        return any(now - max(run.last_change, run.started) > limit
                   for run in daemon.dispatcher.running.values() if run.stage != WAITING_FOR_DEVICE)

    def write(self, *, stopped: bool = False) -> None:
        daemon = self.daemon
        status = self.payload(stopped=stopped)
        # Several daemons may share an outbox: each keeps its own file, status.json is the latest.
        daemon.outbox.write_state_file(f"instances/{daemon.config.service.instance}.json", status)
        daemon.outbox.write_state_file("status.json", status)
        daemon.outbox.write_state_file("weights.json", daemon.registry.samapi_listing())
        daemon.outbox.write_state_page(PAGE, dashboard_page(daemon.outbox.state_folder, status))


def _distinct(models: Any) -> list[dict[str, str]]:
    seen: dict[tuple, dict[str, str]] = {}
    for model in models:
        seen.setdefault(tuple(sorted(model.items())), model)
    return list(seen.values())
