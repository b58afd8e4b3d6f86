"""The daemon loop: watch, queue, dispatch to the executor, record, report.

``Daemon.step(now)`` is one deterministic pass (tests drive it in-process with a fake
executor); ``run_forever`` repeats it. Signal handlers only set flags that the next step
reads. The daemon is built from its collaborators (``Daemon.from_config`` wires the real
ones): the ledger is the truth, ``queueing`` turns files into queued versions,
``dispatch`` hands them to the executor, ``outcomes`` records what became of them and
``status`` reports it all.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch import __version__
from samwatch.control.claims import ClaimStore
from samwatch.config import Config, restart_only_changes
from samwatch.config_file import load_config
from samwatch.control.dispatch import Dispatcher, StopKind, StopRequest
from samwatch.errors import ConfigError
from samwatch.executors.base import Executor, Finished
from samwatch.control.ledger import ACTIVE_STATES, Ledger
from samwatch.weights.registry import WeightsRegistry
from samwatch.control.notify import SystemdNotifier
from samwatch.atomic import sweep_temporaries
from samwatch.control.outbox import SPOOL_FOLDER, Outbox
from samwatch.control.outcomes import OutcomeRecorder
from samwatch.control.queueing import JobQueue
from samwatch.control.retries import Retrier
from samwatch.control.status import StatusReporter
from samwatch.control.input_facts import InputFacts
from samwatch.control.watcher import Watcher

#: status.json is rewritten at the end of a step in which a job changed state (and on every
#: heartbeat), but not more often than this: a burst of tiny jobs must not write it per job
STATUS_MIN_GAP_SECONDS = 0.2


def _make_executor(
    config: Config, registry: Any, *, threaded: bool, clock: Callable[[], float], adapters: Any = None,
) -> Executor:
    if config.executor.kind == "dask":
        from samwatch.executors.dask import DaskExecutor  # samwatch[dask]: imported only when used

        return DaskExecutor(config, registry)
    # The job side (torch, models, codecs) is imported only when this daemon runs jobs itself.
    from samwatch.executors.local import LocalExecutor
    from samwatch.models.device import pick_devices
    from samwatch.models.pool import ModelPool

    pools = [ModelPool(device, config.models, cache_dir=config.state_dir / "encoders", adapters=adapters)
             for device in pick_devices(config.device)]
    return LocalExecutor(config, registry, pools, threaded=threaded, clock=clock)


@dataclass
class Flags:
    """Set by signal handlers, read by the loop: nothing else happens in a handler."""

    stop: bool = False
    stop_now: bool = False
    reload: bool = False


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        ledger: Ledger,
        registry: Any,
        claims: ClaimStore,
        watcher: Watcher,
        executor: Executor,
        outbox: Outbox,
        clock: Callable[[], float] = time.monotonic,
        config_path: Path | None = None,
        config_optional: bool = False,
        notifier: SystemdNotifier | None = None,
        facts: InputFacts | None = None,
        status_gap: float = STATUS_MIN_GAP_SECONDS,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.config_optional = config_optional  # a missing file means the built-in defaults
        self.clock = clock
        self.flags = Flags()
        self.notifier = notifier or SystemdNotifier()
        self.config_error: str | None = None
        self.ledger = ledger
        self.registry = registry
        self.claims = claims
        self.watcher = watcher
        self.executor = executor
        self.outbox = outbox
        self.dispatcher = Dispatcher(executor, ledger, claims, outbox, clock)
        self.facts = facts or InputFacts(config, ledger, threaded=False)
        self.queue = JobQueue(config, ledger, watcher, claims, outbox, self.dispatcher, self.facts)
        self.recorder = OutcomeRecorder(config, ledger, claims, outbox, registry, self.queue)
        self.recorder.recover_unwritten()
        self.reporter = StatusReporter(self)
        self.retrier = Retrier(config, ledger, claims, outbox, registry, clock, self.queue.ticket_of)
        self.workers: list[dict[str, Any]] = executor.workers()
        self._config_mtime = self._stat_config()
        self._next_heartbeat = float("-inf")
        self._next_claim_refresh = float("-inf")
        self._status_dirty = False
        self._status_written = float("-inf")
        self.status_gap = status_gap  # status.json is rewritten at most this often (seconds of ``clock``)

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        config_path: Path | None = None,
        config_optional: bool = False,
        threaded: bool = True,
        clock: Callable[[], float] = time.monotonic,
        notifier: SystemdNotifier | None = None,
        adapters: Any = None,
        status_gap: float = STATUS_MIN_GAP_SECONDS,
    ) -> Daemon:
        """The daemon with its real collaborators; ``threaded=False`` runs each job inside ``step``;
        ``adapters`` is the local pools' families table (``models.pool.AdapterTable``; tests fake it)."""
        for folder in (config.inbox, config.outbox, config.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        outbox = Outbox(config.outbox, spool=config.state_dir / SPOOL_FOLDER, clock=clock)
        outbox.ensure_folders()
        try:
            swept = sweep_temporaries(config.outbox)
        except OSError as exc:  # a read-only outbox: they are swept at the next start
            outbox.note_failure(exc)
            swept = 0
        if swept:
            logger.info(f"removed {swept} temporary files left by an earlier run")
        ledger = Ledger(config.state_dir / "ledger.sqlite3")
        interrupted = ledger.jobs_in(("running",))
        if ledger.recover():
            logger.info(f"{len(interrupted)} interrupted jobs queued again")
            for row in interrupted:
                outbox.queued(row.job_id, "interrupted when samwatch stopped; it runs again")
        # A failed download may be tried again as soon as a job's retry backoff allows.
        registry = WeightsRegistry(config.weights, config.state_dir, retry_after_seconds=config.service.retry_base_seconds,
                                   config_file=config_path)
        executor = _make_executor(config, registry, threaded=threaded, clock=clock, adapters=adapters)
        claims = ClaimStore(outbox.state_folder / "claims", config.service.instance, config.service.claim_ttl_seconds)
        watcher = Watcher(
            config.inbox,
            mode=config.watch.mode,
            settle_seconds=config.watch.settle_seconds,
            poll_interval=config.watch.poll_interval_seconds,
            rescan_interval=config.watch.rescan_interval_seconds,
        )
        return cls(
            config, ledger=ledger, registry=registry, claims=claims, watcher=watcher, executor=executor,
            outbox=outbox, clock=clock, config_path=config_path, config_optional=config_optional, notifier=notifier,
            facts=InputFacts(config, ledger, threaded=threaded), status_gap=status_gap,
        )

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
        # one name per kind of device ("cpu" for two CPU slots); a cluster may have no worker yet
        devices = ", ".join(dict.fromkeys(worker["device"] for worker in self.workers)) or "none yet (no worker)"
        logger.info(
            f"samwatch {__version__} started inbox={self.config.inbox} outbox={self.config.outbox} "
            f"executor={self.executor.kind} device={devices} watch={self.watcher.mode}"
        )

    def run_forever(self, *, grace_seconds: float = 60.0) -> None:
        self._announce()
        self.notifier.ready(self.status_line())
        try:
            while not self.flags.stop:
                try:
                    self.step(self.clock())
                    self._collect(self._sleep_time())
                except Exception as exc:  # the loop must outlive any one bad pass (a share hiccup, a bug)
                    logger.opt(exception=exc).error(f"daemon pass failed, retrying: {exc!r}")
                    time.sleep(1.0)
            self._stop(grace_seconds)
        finally:
            self.close()

    def run_once(self) -> int:
        """Process everything ready now; 0 if every job succeeded, 1 if any failed."""
        self._announce()
        try:
            while not self.flags.stop:
                self.step(self.clock())
                idle = not self.dispatcher.running and not self.ledger.jobs_in(ACTIVE_STATES)
                if idle and not self.watcher.pending and not self.facts.busy:
                    break
                self._collect(0.05)
            if self.flags.stop:
                self._stop(0.0)
        finally:
            self.close()
        return 1 if self.recorder.stats.failed else 0

    def _sleep_time(self) -> float:
        if self.watcher.pending or self.dispatcher.running or self.facts.busy:
            return 0.1
        return min(0.5, self.config.watch.poll_interval_seconds / 4)

    def step(self, now: float) -> None:
        if self.flags.reload or self._config_changed():
            self.flags.reload = False
            self.reload()
        changed, vanished = self.watcher.poll(now)
        arrived = self.facts.drain()
        if changed or vanished or arrived:
            self.queue.discover(changed, vanished, arrived)
        self._collect(0.0)
        self.outbox.retry()
        self.recorder.note_landed()
        self.recorder.check_waiting()
        self.retrier.step(now)
        if not self.flags.stop:
            self._dispatch(now)
        self._collect(0.0)
        if now >= self._next_claim_refresh:
            self.dispatcher.refresh_claims()
            self._next_claim_refresh = now + min(5.0, self.config.service.claim_ttl_seconds / 4)
        if now >= self._next_heartbeat:
            self.heartbeat()
        elif self._status_dirty and now - self._status_written >= self.status_gap:
            self._write_status()

    def _dispatch(self, now: float) -> None:
        while self.dispatcher.free_slots() > 0 and (picked := self.queue.next_ready(now)) is not None:
            self.dispatcher.start(*picked)
            self._status_changed()
            self._collect(0.0)  # an inline executor has finished it already

    def _collect(self, timeout: float) -> None:
        """Apply the executor's messages; waits up to ``timeout`` for the first (the loop's sleep)."""
        for event in self.executor.poll(timeout):
            if isinstance(event, Finished):
                run = self.dispatcher.take(event)
                if run is not None:
                    self.recorder.record(run, event.outcome, stopping=self.flags.stop)
                self._status_changed()
            else:
                self.dispatcher.on_progress(event)

    def _status_changed(self) -> None:
        self._status_dirty = True

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
            new = load_config(self.config_path, missing_ok=self.config_optional)
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
        self.executor.reconfigure(new, changed)
        self.watcher.settle_seconds = new.watch.settle_seconds
        self.config = self.recorder.config = self.facts.config = new
        self.config_error = None
        self.retrier.after_change(new)
        self.queue.reconfigure(new)
        logger.info(f"config reloaded from {self.config_path}; weights changed: {sorted(changed) or 'none'}")
        self.notifier.ready(self.status_line())
        self.heartbeat()
        return True

    # ---- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.reporter.payload()

    def status_line(self) -> str:
        return self.reporter.line()

    def heartbeat(self) -> None:
        self.outbox.ensure_folders()  # someone may have removed them (rm -rf outbox): ours come back
        self._write_status()
        self._next_heartbeat = self.clock() + self.config.service.heartbeat_seconds
        self.notifier.status(self.status_line())
        if self.notifier.watchdog_seconds and not self.reporter.job_stalled():
            self.notifier.watchdog()

    def _write_status(self, *, stopped: bool = False) -> None:
        self.workers = [] if stopped else self.executor.workers()  # a stopped daemon holds no worker
        self._status_dirty = False
        self._status_written = self.clock()
        self.reporter.write(stopped=stopped)

    # ---- stopping ---------------------------------------------------------------------

    def _stop(self, grace_seconds: float) -> None:
        self.notifier.stopping()
        deadline = self.clock() + grace_seconds
        asked = False
        while self.dispatcher.running:
            if not asked and (self.flags.stop_now or self.clock() >= deadline):
                self.dispatcher.stop_all(StopRequest(StopKind.REQUEUE, "the daemon is stopping"))
                asked = True
            self._collect(0.05)
            if self.dispatcher.running and self.clock() > deadline + 30:
                jobs = ", ".join(run.ticket.job_id for run in self.dispatcher.running.values())
                logger.warning(f"jobs {jobs} did not stop; they run again after restart")
                break

    def close(self) -> None:
        self.executor.close()
        self.facts.close()
        self._write_status(stopped=True)
        self.watcher.close()
        self.registry.close()
        self.ledger.close()
        logger.info("samwatch stopped")
