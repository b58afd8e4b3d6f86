"""The daemon loop: watch, queue, dispatch one job at a time, record, report.

``Daemon.step(now)`` is one deterministic pass (tests drive it directly); ``run_forever``
repeats it. Signal handlers only set flags that the next step reads. Jobs run in one worker
thread so the loop keeps watching the inbox, writing queued jobs' progress files, and
beating the heartbeat while a long job runs; with ``threaded=False`` (``run --once`` and
tests) a job runs inside the step.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch import __version__
from samwatch.claims import ClaimStore
from samwatch.config import Config, load_config, restart_only_changes
from samwatch.discovery import JobSource, find_jobs, is_folder_defaults
from samwatch.errors import ConfigError, JobError
from samwatch.jobs import JobRunner, JobTicket, Outcome, Progress, move_inputs
from samwatch.ledger import JobRow, Ledger
from samwatch.media import content_hash
from samwatch.models.device import describe, pick_device
from samwatch.models.pool import ModelPool
from samwatch.weights.registry import WeightsRegistry
from samwatch.notify import SystemdNotifier
from samwatch.outbox import STATE_FOLDER, JobOutputs, atomic_write_json, now_iso, sweep_temporaries
from samwatch.job_sidecar import load_job_sidecar
from samwatch.outputs.dashboard import Dashboard
from samwatch.watcher import Watcher


@dataclass
class Flags:
    """Set by signal handlers, read by the loop: nothing else happens in a handler."""

    stop: bool = False
    stop_now: bool = False
    reload: bool = False


@dataclass
class Running:
    ticket: JobTicket
    row: JobRow
    progress: Progress
    cancel: threading.Event
    started: float
    cancel_reason: str = ""


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    recent_failures: deque = field(default_factory=lambda: deque(maxlen=20))


class Worker(threading.Thread):
    """Runs tickets one at a time; results come back through ``results``."""

    def __init__(self) -> None:
        super().__init__(name="samwatch-worker", daemon=True)
        self.tickets: queue.Queue[tuple[JobRunner, JobTicket, Progress] | None] = queue.Queue()
        self.results: queue.Queue[tuple[JobTicket, Outcome]] = queue.Queue()

    def run(self) -> None:
        while (item := self.tickets.get()) is not None:
            runner, ticket, progress = item
            self.results.put((ticket, runner.run(ticket, progress)))


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.threaded = threaded
        self.flags = Flags()
        self.notifier = notifier or SystemdNotifier()
        self.stats = RunStats(recent_failures=deque(maxlen=config.service.recent_failures or 1))
        self.config_error: str | None = None
        self.started_at = now_iso()
        self._config_mtime = self._stat_config()
        for folder in (config.inbox, config.outbox, config.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.status_dir = config.outbox / STATE_FOLDER
        self.status_dir.mkdir(parents=True, exist_ok=True)
        self.dashboard = Dashboard(config.outbox, self.status_dir)
        swept = sweep_temporaries(config.outbox)
        if swept:
            logger.info(f"removed {swept} temporary files left by an earlier run")
        self.device = pick_device(config.device)
        self.ledger = Ledger(config.state_dir / "ledger.sqlite3")
        recovered = self.ledger.recover()
        if recovered:
            logger.info(f"{recovered} interrupted jobs queued again")
        self.registry = WeightsRegistry(config.weights, config.state_dir)
        self.pool = ModelPool(self.device, config.models, cache_dir=config.state_dir / "encoders")
        self.claims = ClaimStore(self.status_dir / "claims", config.service.instance, config.service.claim_ttl_seconds)
        self.watcher = Watcher(
            config.inbox,
            mode=config.watch.mode,
            settle_seconds=config.watch.settle_seconds,
            poll_interval=config.watch.poll_interval_seconds,
            rescan_interval=config.watch.rescan_interval_seconds,
        )
        self.worker = Worker() if threaded else None
        if self.worker is not None:
            self.worker.start()
        self.running: Running | None = None
        self._image_refs: dict[str, tuple[Any, str | None]] = {}  # sidecar -> (file state, image key)
        self._known_jobs: dict[str, JobSource] = {}
        self._next_heartbeat = float("-inf")
        self._busy_elsewhere: dict[str, float] = {}
        self._waiting_on: dict[str, tuple[str, str] | None] = {}

    # ---- signals ----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_stop(signum: int, _frame: Any) -> None:
            if self.flags.stop:
                self.flags.stop_now = True
            self.flags.stop = True

        def on_reload(_signum: int, _frame: Any) -> None:
            self.flags.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    # ---- the loop ---------------------------------------------------------------------

    def _announce(self) -> None:
        # Logged when the loop starts, after the CLI set the signal handlers: "started" means
        # a SIGTERM from now on stops the daemon cleanly.
        logger.info(
            f"samwatch {__version__} started inbox={self.config.inbox} outbox={self.config.outbox} "
            f"device={describe(self.device)} watch={self.watcher.mode}"
        )

    def run_forever(self, *, grace_seconds: float = 60.0) -> None:
        self._announce()
        self.notifier.ready(self.status_line())
        try:
            while not self.flags.stop:
                try:
                    self.step(self.clock())
                except Exception as exc:  # the loop must outlive any one bad pass (a share hiccup, a bug)
                    logger.opt(exception=exc).error(f"daemon pass failed, retrying: {exc!r}")
                    time.sleep(1.0)
                self._wait(self._sleep_time())
            self._stop(grace_seconds)
        finally:
            self.close()

    def run_once(self) -> int:
        """Process everything ready now; 0 if every job succeeded, 1 if any failed."""
        self._announce()
        try:
            while not self.flags.stop:
                self.step(self.clock())
                idle = self.running is None and not self.ledger.jobs_in(("queued", "waiting", "running"))
                if idle and not self.watcher.pending:
                    break
                time.sleep(0.05)
            if self.flags.stop:
                self._stop(0.0)
        finally:
            self.close()
        return 1 if self.stats.failed else 0

    def _wait(self, timeout: float) -> None:
        """Sleep until the next pass, waking at once when the running job ends."""
        if self.worker is None or self.running is None:
            time.sleep(timeout)
            return
        try:
            ticket, outcome = self.worker.results.get(timeout=timeout)
        except queue.Empty:
            return
        self._record(ticket, outcome)

    def _sleep_time(self) -> float:
        if self.watcher.pending or self.running is not None:
            return 0.1
        return min(0.5, self.config.watch.poll_interval_seconds / 4)

    def step(self, now: float) -> None:
        if self.flags.reload or self._config_changed():
            self.flags.reload = False
            self.reload()
        changed, vanished = self.watcher.poll(now)
        if changed or vanished:
            self._discover(changed, vanished)
        self._collect()
        self._check_waiting()
        if not self.flags.stop:
            self._dispatch(now)
        self._collect()
        if now >= self._next_heartbeat:
            self.heartbeat()
            self._next_heartbeat = now + self.config.service.heartbeat_seconds

    # ---- discovery --------------------------------------------------------------------

    def _image_ref(self, rel: str) -> str | None:
        """The sidecar's ``image:`` key, if it can be read (errors surface when the job runs)."""
        state = self.watcher.settled.get(rel)
        cached = self._image_refs.get(rel)
        if cached is not None and cached[0] == state:
            return cached[1]
        try:
            ref = load_job_sidecar(self.config, rel, problems=[]).sidecar.image
        except (OSError, JobError):
            ref = None
        self._image_refs[rel] = (state, ref)
        return ref

    def _hash(self, rel: str) -> str:
        stamp = asdict(self.watcher.settled[rel])
        cached = self.ledger.cached_hash(rel, **stamp)
        if cached is None:
            cached = content_hash(self.config.inbox / rel)
            self.ledger.store_hash(rel, cached, **stamp)
        return cached

    def _discover(self, changed: set[str], vanished: set[str]) -> None:
        settled = self.watcher.settled
        files = set(settled) | self.watcher.pending
        jobs = {job.job_id: job for job in find_jobs(self.config.inbox, files, self._image_ref)}
        previous = self._known_jobs
        for job_id in set(previous) - set(jobs):
            self._forget(previous[job_id])
        self._known_jobs = jobs
        touched = changed | vanished
        for path in vanished:
            self._image_refs.pop(path, None)
        for job in list(jobs.values()):
            if job.job_id in previous and previous[job.job_id] == job and not (set(job.inputs) & touched):
                continue  # nothing it depends on changed
            if any(path not in settled for path in job.inputs):
                continue  # something it needs is still being written
            try:
                self._enqueue(job)
            except (OSError, JobError) as exc:  # vanished or unreadable since the scan
                logger.warning(f"job {job.job_id} not queued yet: {exc}")
                self._known_jobs.pop(job.job_id, None)

    def _enqueue(self, job: JobSource) -> None:
        hashes = [self._hash(path) for path in job.inputs]
        version = hashlib.sha256("\n".join([*job.inputs, *hashes]).encode()).hexdigest()
        sidecar = job.sidecar or job.defaults
        group = job.job_id.split("/", 1)[0] if "/" in job.job_id else ""
        image_sha = self._hash(job.image) if job.image else None
        if self.ledger.upsert(
            job.job_id, sidecar=sidecar, image=job.image, image_sha=image_sha, version=version,
            priority=self._priority(job), grp=group,
        ):
            elsewhere = self.claims.finished_elsewhere(job.job_id, version)
            if elsewhere is not None:  # another daemon on this share did it: its outputs stand
                self.ledger.set_state(job.job_id, elsewhere, version=version)
                return
            logger.info(f"job {job.job_id} queued version={version[:12]}")
            if self.running is not None and self.running.ticket.job_id == job.job_id:
                self._cancel_running("its inputs changed; the new version runs next")
            else:
                JobOutputs(self.config.outbox, job.job_id).write_progress("queued", "queued", 0, "waiting for its turn")

    def _priority(self, job: JobSource) -> int:
        """The sidecar's priority, else its folder defaults', else the config's."""
        try:
            return load_job_sidecar(self.config, job.sidecar or job.defaults or "", problems=[]).priority
        except (OSError, JobError):
            return self.config.defaults.priority

    def _forget(self, job: JobSource) -> None:
        """Its sidecar (or image) is gone: a queued job is cancelled, a running one stopped."""
        row = self.ledger.get(job.job_id)
        if row is None or row.state not in ("queued", "waiting", "running"):
            return
        if self.running is not None and self.running.ticket.job_id == job.job_id:
            self._cancel_running("its sidecar was removed")
            return
        self.ledger.set_state(job.job_id, "cancelled")
        JobOutputs(self.config.outbox, job.job_id).write_progress(
            "cancelled", "cancelled", 0, "its sidecar or image was removed before it ran"
        )
        logger.info(f"job {job.job_id} cancelled: inputs removed")

    def _cancel_running(self, reason: str) -> None:
        assert self.running is not None
        self.running.cancel_reason = reason
        self.running.cancel.set()

    # ---- dispatch ---------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        if self.running is not None:
            self.claims.refresh(self.running.ticket.job_id, self.running.ticket.version)
            return
        self._busy_elsewhere = {job: until for job, until in self._busy_elsewhere.items() if until > now}
        skipped = set(self._busy_elsewhere)
        while (row := self.ledger.next_job(exclude=frozenset(skipped))) is not None:
            elsewhere = self.claims.finished_elsewhere(row.job_id, row.version)
            if elsewhere is not None:
                self.ledger.finish(row, elsewhere)
                # Our "queued" may have landed after the other daemon's final progress: restore it.
                JobOutputs(self.config.outbox, row.job_id).write_progress(
                    elsewhere, elsewhere, 100 if elsewhere == "done" else 0, "finished by another daemon on this share"
                )
                logger.info(f"job {row.job_id} finished by another daemon ({elsewhere})")
                continue
            if not self.claims.try_claim(row.job_id, row.version):
                self._busy_elsewhere[row.job_id] = now + 2.0
                skipped.add(row.job_id)
                continue
            self._start(row)
            return

    def _start(self, row: JobRow) -> None:
        ticket = JobTicket(row.job_id, row.sidecar, row.image, row.image_sha, row.version)
        cancel = threading.Event()
        outputs = JobOutputs(self.config.outbox, row.job_id)
        progress = Progress(outputs, cancel, clock=self.clock)
        progress.last_change = self.clock()
        outputs.write_progress("running", "reading", 0, "started")
        self.ledger.start(row)
        self.running = Running(ticket, row, progress, cancel, self.clock())
        runner = JobRunner(self.config, self.registry, self.pool, self.config.models.prompt_batch_size)
        logger.info(f"job {row.job_id} started")
        if self.worker is not None:
            self.worker.tickets.put((runner, ticket, progress))
        else:
            self._record(ticket, runner.run(ticket, progress))

    def _collect(self) -> None:
        if self.worker is None:
            return
        try:
            ticket, outcome = self.worker.results.get_nowait()
        except queue.Empty:
            return
        self._record(ticket, outcome)

    def _record(self, ticket: JobTicket, outcome: Outcome) -> None:
        running = self.running
        assert running is not None and running.ticket == ticket
        self.running = None
        outputs = JobOutputs(self.config.outbox, ticket.job_id)
        row = running.row
        if outcome.state == "waiting":
            self.ledger.set_state(ticket.job_id, "waiting", version=ticket.version)
            self.claims.release(ticket.job_id, ticket.version, None)
            self._waiting_on[ticket.job_id] = outcome.waiting_for
            return
        if outcome.state == "cancelled":
            if self.flags.stop or "inputs changed" in running.cancel_reason:
                # Interrupted, not refused: it runs again (after a restart, or as its new version).
                self.ledger.finish(row, "queued")
                self.claims.release(ticket.job_id, ticket.version, None)
                logger.info(f"job {ticket.job_id} interrupted: {running.cancel_reason or 'stopping'}")
                return
            message = f"The job was cancelled: {running.cancel_reason or 'cancelled'}."
            outputs.write_progress("cancelled", "cancelled", running.progress.percent, message)
            self.ledger.finish(row, "cancelled")
            self.claims.release(ticket.job_id, ticket.version, None)
            self.stats.cancelled += 1
            logger.info(f"job {ticket.job_id} cancelled: {running.cancel_reason}")
            return
        if outcome.state == "done":
            outputs.write_progress("done", "done", 100, f"{outcome.features} features")
            self.stats.done += 1
            self.dashboard.record_result(ticket.job_id, features=outcome.features, seconds=outcome.seconds)
            logger.info(outcome.summary)
        else:
            assert outcome.error is not None
            error = outcome.error
            outputs.write_error({**error.to_dict(), "job": ticket.job_id, "sidecar": ticket.sidecar, "image": ticket.image})
            self.dashboard.forget_result(ticket.job_id)
            outputs.write_progress("failed", "failed", running.progress.percent, error.message)
            self.stats.failed += 1
            self.stats.recent_failures.append(
                {"job": ticket.job_id, "error": error.code, "message": error.message, "at": now_iso()}
            )
            logger.warning(f"job {ticket.job_id} failed error={error.code} seconds={outcome.seconds:.2f}: {error.message}")
        self.ledger.finish(row, outcome.state, error=outcome.error.code if outcome.error else None)
        self.claims.release(ticket.job_id, ticket.version, outcome.state)
        if self.config.inputs.after == "move":
            self._move_inputs(ticket, outcome.state == "done")

    def _move_inputs(self, ticket: JobTicket, success: bool) -> None:
        paths = [p for p in (ticket.sidecar,) if p and not is_folder_defaults(p)]
        image = ticket.image
        others = [
            job for job in self._known_jobs.values()
            if job.image == image and job.job_id != ticket.job_id
            and (row := self.ledger.get(job.job_id)) is not None and row.state in ("queued", "waiting", "running")
        ]
        if image and not others:
            paths.append(image)
        move_inputs(self.config.inbox, paths, success)

    # ---- weights downloads ------------------------------------------------------------

    def _check_waiting(self) -> None:
        for job_id, key in list(self._waiting_on.items()):
            row = self.ledger.get(job_id)
            if row is None or row.state != "waiting" or key is None:
                self._waiting_on.pop(job_id, None)
                continue
            state = self.registry.request(*key)
            error = getattr(state, "error", None)
            outputs = JobOutputs(self.config.outbox, job_id)
            if error is not None:
                self._waiting_on.pop(job_id)
                outputs.write_error({**error.to_dict(), "job": job_id, "sidecar": row.sidecar, "image": row.image})
                self.dashboard.forget_result(job_id)
                outputs.write_progress("failed", "failed", 5, error.message)
                self.ledger.finish(row, "failed", error=error.code)
                self.stats.failed += 1
                self.stats.recent_failures.append({"job": job_id, "error": error.code, "message": error.message, "at": now_iso()})
                logger.warning(f"job {job_id} failed error={error.code}: {error.message}")
            elif not hasattr(state, "state"):
                self._waiting_on.pop(job_id)
                self.ledger.set_state(job_id, "queued", version=row.version)
            else:
                outputs.write_progress(
                    "queued", "waiting for weights", 5,
                    f"downloading weights {key[1]} for {key[0]}: {getattr(state, 'percent', 0) or 0:.0f}%",
                )

    # ---- reload -----------------------------------------------------------------------

    def _stat_config(self) -> tuple[int, int] | None:
        if self.config_path is None:
            return None
        try:
            stat = self.config_path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _config_changed(self) -> bool:
        current = self._stat_config()
        if current != self._config_mtime:
            self._config_mtime = current
            return True
        return False

    def reload(self) -> bool:
        """Re-read the config; a bad one is refused and the old one stays in force."""
        if self.config_path is None:
            return False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            blocked = restart_only_changes(self.config, new)
            if blocked:
                raise ConfigError(
                    str(self.config_path),
                    [f"{key}: changing it needs a restart (systemctl restart samwatch)" for key in blocked],
                )
        except ConfigError as exc:
            self.config_error = str(exc)
            logger.error(f"config reload refused, previous config stays in force: {exc}")
            self.notifier.ready(self.status_line())
            self.heartbeat()
            return False
        changed = self.registry.update(new.weights)
        self.pool.evict(changed)
        self.pool.settings = new.models
        self.watcher.settle_seconds = new.watch.settle_seconds
        self.config = new
        self.config_error = None
        logger.info(f"config reloaded from {self.config_path}; weights changed: {sorted(changed) or 'none'}")
        self.notifier.ready(self.status_line())
        self.heartbeat()
        return True

    # ---- status -----------------------------------------------------------------------

    def status_line(self) -> str:
        counts = self.ledger.counts()
        current = f"running {self.running.ticket.job_id} {self.running.progress.percent:.0f}%" if self.running else "idle"
        return f"{current}; queued {counts.get('queued', 0)}, done {self.stats.done}, failed {self.stats.failed}"

    def job_stalled(self) -> bool:
        running = self.running
        if running is None:
            return False
        last = max(running.progress.last_change, running.started)
        return self.clock() - last > self.config.service.job_stall_seconds

    def status(self) -> dict[str, Any]:
        counts = self.ledger.counts()
        current = None
        if self.running is not None:
            current = {
                "job": self.running.ticket.job_id,
                "stage": self.running.progress.stage,
                "percent": round(self.running.progress.percent),
                "seconds": round(self.clock() - self.running.started, 1),
            }
        return {
            "state": "stopping" if self.flags.stop else ("running" if self.running else "idle"),
            "version": __version__,
            "instance": self.config.service.instance,
            "pid": os.getpid(),
            "started": self.started_at,
            "updated": now_iso(),
            "heartbeat_seconds": self.config.service.heartbeat_seconds,
            "device": describe(self.device),
            "watch_mode": self.watcher.mode,
            "inbox": str(self.config.inbox),
            "queue": {"queued": counts.get("queued", 0), "waiting": counts.get("waiting", 0)},
            "totals": {**counts, "done_this_run": self.stats.done, "failed_this_run": self.stats.failed},
            "current": current,
            "loaded_models": self.pool.loaded(),
            "downloads": [item for item in self.registry.listing() if item.get("state") == "downloading"],
            "recent_failures": list(self.stats.recent_failures),
            "recent_results": self.dashboard.recent_results(),
            "config": {"path": str(self.config_path) if self.config_path else None, "error": self.config_error},
        }

    def heartbeat(self) -> None:
        status = self.status()
        # Several daemons may share an outbox: each keeps its own file, status.json is the latest.
        atomic_write_json(self.status_dir / "instances" / f"{self.config.service.instance}.json", status, durable=False)
        atomic_write_json(self.status_dir / "status.json", status, durable=False)
        atomic_write_json(self.status_dir / "weights.json", self.registry.samapi_listing(), durable=False)
        self.dashboard.write(status)
        self.notifier.status(self.status_line())
        if self.notifier.watchdog_seconds and not self.job_stalled():
            self.notifier.watchdog()

    # ---- stopping ---------------------------------------------------------------------

    def _stop(self, grace_seconds: float) -> None:
        self.notifier.stopping()
        deadline = self.clock() + grace_seconds
        while self.running is not None:
            if self.flags.stop_now or self.clock() >= deadline:
                self._cancel_running("the daemon is stopping")
            self._collect()
            if self.running is not None:
                time.sleep(0.05)
                if self.clock() > deadline + 30:
                    logger.warning(f"job {self.running.ticket.job_id} did not stop; it runs again after restart")
                    break
        self.heartbeat()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.tickets.put(None)
        self.watcher.close()
        self.registry.close()
        self.ledger.close()
        logger.info("samwatch stopped")
