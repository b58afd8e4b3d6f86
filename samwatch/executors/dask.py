"""Jobs on a Dask cluster: an existing scheduler (``address``) or a dask-jobqueue cluster.

The daemon keeps everything but the run itself. Before dispatch it resolves the job's
weights (fetched and verified into ``state_dir``), so a worker only loads a file it can see
(``path_map`` rewrites prefixes for workers that mount the share elsewhere). Each worker
keeps a model pool between jobs (``dask_units.worker_pool``: keyed by type, weights and sha256).
Progress comes back as worker events (``log_event`` → ``subscribe_topic``); cancelling sets
a cluster-wide ``Event`` the job's ``Progress`` checks and cancels the future. A worker that
dies mid-job makes the scheduler run the task elsewhere; the daemon sees one result per
future, and the ledger's dispatch token drops anything older (see executors/base.py).
Progress events name the worker that sent them: status.json shows what each worker runs, and
a worker that leaves holding a job, and that job's new start elsewhere, are logged.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from loguru import logger

from samwatch.config import Config
from samwatch.errors import JobCancelled, JobError
from samwatch.executors.base import Dispatch, Event, Finished, ProgressReport, worker_identity
from samwatch.executors.dask_units import UNIT_PREFIX, ClusterUnits, worker_pool
from samwatch.executors.jobqueue import TASK_PREFIX, start_jobqueue_cluster
from samwatch.executors.path_map import as_workers_see_them
from samwatch.memory import PeakMeter, give_back
from samwatch.vocab import JobTicket, LoadSpec, Outcome, Progress, error_from_wire

PROGRESS_TOPIC = "samwatch-progress"
#: a worker asks the scheduler whether its job was cancelled at most this often
CANCEL_CHECK_SECONDS = 0.5
WORKER_INFO_SECONDS = 2.0
#: a cluster samwatch started that has had no worker this long while jobs wait is logged
NO_WORKER_WARNING_SECONDS = 60.0


class DaskExecutor:
    kind = "dask"

    def __init__(self, config: Config, registry: Any, *, client: Any = None) -> None:
        from distributed import Client

        self._config = config
        self._registry = registry
        settings = config.executor
        self._cluster = None
        self._worker_logs = config.state_dir / "worker-logs"
        self._starved_since: float | None = None  # jobs wait and the started cluster has no worker
        if client is None:
            if settings.cluster is not None:
                self._cluster = start_jobqueue_cluster(settings.cluster, self._worker_logs)
                client = Client(self._cluster)
            else:
                client = Client(settings.address, timeout="30s")
        self.client = client
        self._events: queue.Queue[Event] = queue.Queue()
        self._futures: dict[str, tuple[Dispatch, Any]] = {}  # token -> (dispatch, future)
        self._immediate: list[Finished] = []
        self._worker_info: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        self._running_on: dict[str, tuple[str, str]] = {}  # token -> (name, address) its progress last came from
        self._counts: dict[str, dict[str, int]] = {}  # worker name -> {"done": n, "failed": n}
        self._known: dict[str, str] = {}  # worker address -> name, as last seen
        # worker address -> tokens the scheduler said it was processing, as last seen: a worker
        # killed before its first progress event reached us is still known to have held its job
        self._processing_seen: dict[str, list[str]] = {}
        self._lost: set[str] = set()  # addresses of workers whose loss was logged
        self._lost_lock = threading.Lock()  # progress events arrive on the client's thread
        self.client.subscribe_topic(PROGRESS_TOPIC, self._on_event)
        logger.info(f"dask executor on {self.client.scheduler.address}")

    # ---- the seam ----------------------------------------------------------------------------

    def free_slots(self) -> int:
        return self.in_flight_limit() - len(self._futures)

    def in_flight_limit(self) -> int:
        """Jobs the cluster holds at once: its threads now; with an adaptive cluster, enough for
        ``adapt_maximum`` workers, since adapt asks the batch system only for work the scheduler
        holds (and no more: a backlog of thousands stays in the daemon's queue)."""
        threads = sum(self.client.nthreads().values())
        cluster = self._config.executor.cluster
        if cluster is not None:  # two per thread: adapt's estimate stays above a worker's work as jobs end
            return max(threads, 2 * cluster.adapt_maximum * cluster.cores)
        return max(1, threads)  # with none yet, one job makes the cluster's own autoscaler act

    def submit(self, dispatch: Dispatch) -> None:
        ticket = dispatch.ticket
        try:
            spec = self._resolve(ticket)
        except JobError as error:  # the worker would fail it the same way: do it here, without a round trip
            self._immediate.append(Finished(ticket.job_id, dispatch.token, Outcome("failed", error=error), "daemon"))
            return
        if isinstance(spec, tuple):  # weights still downloading: the job waits here, not on a worker
            self._immediate.append(Finished(ticket.job_id, dispatch.token, Outcome("waiting", waiting_for=spec), "daemon"))
            return
        config, seen_ticket, seen_spec = as_workers_see_them(self._config, ticket, spec)  # path_map applied
        job = WorkerJob(config, seen_ticket, dispatch.token, seen_spec)
        future = self.client.submit(run_on_worker, job, key=f"{TASK_PREFIX}-{dispatch.token}", pure=False)
        self._futures[dispatch.token] = (dispatch, future)

    def _resolve(self, ticket: JobTicket) -> LoadSpec | tuple[str, str]:
        """The weights the ticket names (discovery read the sidecar: the worker parses it once)."""
        if ticket.sidecar is None:
            raise JobError("image_not_found", "The job has no sidecar.")
        if ticket.sidecar_error is not None:
            raise error_from_wire(ticket.sidecar_error)
        assert ticket.model_type is not None and ticket.weights_name is not None  # queueing names them
        spec = self._registry.request(ticket.model_type, ticket.weights_name)
        if isinstance(spec, LoadSpec):
            return spec
        if spec.error is not None:
            raise spec.error
        return (ticket.model_type, ticket.weights_name)

    def poll(self, timeout: float = 0.0) -> list[Event]:
        events: list[Event] = list(self._immediate)
        self._immediate.clear()
        for token, (dispatch, future) in list(self._futures.items()):
            if future.done():
                del self._futures[token]
                outcome = _outcome_of(future)
                worker = outcome.worker["name"] if outcome.worker else "unknown"
                self._running_on.pop(token, None)
                if outcome.state in ("done", "failed"):
                    counts = self._counts.setdefault(worker, {"done": 0, "failed": 0})
                    counts[outcome.state] += 1
                events.append(Finished(dispatch.ticket.job_id, token, outcome, worker))
        try:
            if not events and timeout > 0:
                events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            return events

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        message = event[1]
        token, worker = message["token"], (message.get("worker_name"), message.get("worker"))
        if worker[0] is not None and token in self._futures:
            before = self._running_on.get(token)
            if before is not None and before[1] != worker[1]:  # the scheduler moved it: its worker was lost
                self._log_lost(before[1], before[0], [message["job"]])
                logger.warning(f"job {message['job']} runs again on dask worker {worker[0]} (it was on {before[0]})")
            self._running_on[token] = worker
        self._events.put(ProgressReport(message["job"], token, message["stage"], message["percent"], message["message"]))

    def cancel(self, token: str) -> None:
        from distributed import Event as ClusterEvent

        entry = self._futures.pop(token, None)
        if entry is None:
            return
        dispatch, future = entry
        ClusterEvent(_cancel_name(token), client=self.client).set()  # the running job stops at its next report
        future.cancel()
        self._immediate.append(Finished(
            dispatch.ticket.job_id, token, Outcome("cancelled", error=JobCancelled()), "daemon"
        ))

    def workers(self) -> list[dict[str, Any]]:
        fetched, info = self._worker_info
        if time.monotonic() - fetched < WORKER_INFO_SECONDS:
            return info
        try:
            loaded = self.client.run(worker_state, self._config.executor.device)
            processing = self.client.processing()
            scheduler = self.client.scheduler_info().get("workers", {})
        except Exception as exc:  # noqa: BLE001 - a cluster hiccup must not stop the status
            logger.warning(f"dask: cannot read the workers' state: {exc!r}")
            return info
        names = {address: str(scheduler.get(address, {}).get("name", address)) for address in loaded}
        tokens_of_keys = {f"{TASK_PREFIX}-{token}": token for token in self._futures}
        self._note_departures(names)
        self._processing_seen = {address: [tokens_of_keys[key] for key in keys if key in tokens_of_keys]
                                 for address, keys in processing.items()}
        self._note_starved(bool(loaded))
        in_hand: dict[str, list[str]] = {}
        for token, (worker, _) in list(self._running_on.items()):
            if token in self._futures:
                in_hand.setdefault(worker, []).append(self._futures[token][0].ticket.job_id)
        jobs_of_tokens = {token: dispatch.ticket.job_id for token, (dispatch, _) in self._futures.items()}
        keys = {f"{TASK_PREFIX}-{token}": job for token, job in jobs_of_tokens.items()}
        info = []
        for address, state in sorted(loaded.items()):
            name = names[address]
            # Reported progress says what a worker runs; a job it has not reported on yet, the scheduler's view.
            jobs = in_hand.get(name) or [keys[key] for key in processing.get(address, ()) if key in keys][:1]
            info.append({
                "name": name,
                "host": scheduler.get(address, {}).get("host", address),
                "device": state["device"],
                "memory_mb": round(scheduler.get(address, {}).get("metrics", {}).get("memory", 0) / 2**20),
                "loaded_models": state["loaded_models"],
                **({"slurm_job": state["slurm_job"]} if "slurm_job" in state else {}),
                "job": jobs[0] if jobs else None,
                "jobs": jobs,
                "units": _units_of_jobs(processing.get(address, ()), jobs_of_tokens),
                **self._counts.get(name, {"done": 0, "failed": 0}),
            })
        self._worker_info = (time.monotonic(), info)
        return info

    def _note_departures(self, names: dict[str, str]) -> None:
        """Log a worker that left while it ran a job (adapt retires only idle ones: this one was lost)."""
        for address, name in self._known.items():
            if address in names:
                continue
            tokens = {token for token, (_, at) in self._running_on.items() if at == address}
            tokens.update(token for token in self._processing_seen.get(address, ()) if token not in self._running_on)
            held = sorted(token for token in tokens if token in self._futures)
            for token in held:  # so the job's next progress, from another worker, logs its re-run
                self._running_on[token] = (name, address)
            if held:
                self._log_lost(address, name, [self._futures[token][0].ticket.job_id for token in held])
        self._known = names

    def _note_starved(self, any_worker: bool) -> None:
        """Once per stretch: jobs wait on a cluster samwatch started and no worker has joined (the
        worker jobs wait in the batch queue, or die at start: a wrong python, env or prologue)."""
        if self._cluster is None or any_worker or not self._futures:
            self._starved_since = None
            return
        now = time.monotonic()
        if self._starved_since is None:
            self._starved_since = now
        elif now - self._starved_since >= NO_WORKER_WARNING_SECONDS:
            logger.warning(
                f"no cluster worker has joined for {NO_WORKER_WARNING_SECONDS:.0f} s with {len(self._futures)} job(s) waiting: "
                f"the worker jobs are queued, or fail at start (see {self._worker_logs})"
            )
            self._starved_since = float("inf")  # said; again only after a worker came and went

    def _log_lost(self, address: str, name: str, jobs: list[str]) -> None:
        """Once per worker: seen gone from the scheduler, or its job's progress came from another."""
        with self._lost_lock:
            if address in self._lost:
                return
            self._lost.add(address)
        logger.warning(f"dask worker {name} lost while running job {', '.join(jobs)}; the scheduler runs it again")

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        self._config = config
        if changed:
            self.client.run(evict_on_worker, sorted(changed))

    def close(self) -> None:
        for token in list(self._futures):
            self._futures[token][1].release()
        self._futures.clear()
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


# ---- what runs on a worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    config: Config
    ticket: JobTicket
    token: str
    spec: LoadSpec


class _ResolvedWeights:
    """The registry a worker sees: the one entry the daemon resolved before dispatch."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec

    def request(self, model_type: str, name: str) -> LoadSpec:
        return self.spec


class _EventChannel:
    def __init__(self, worker: Any, job: WorkerJob) -> None:
        self.worker, self.job = worker, job

    def running(self, stage: str, percent: float, message: str = "") -> None:
        self.worker.log_event(PROGRESS_TOPIC, {
            "job": self.job.ticket.job_id, "token": self.job.token, "stage": stage, "percent": percent, "message": message,
            "worker_name": str(self.worker.name),  # the scheduler adds "worker": the address
        })


class _CancelFlag:
    def __init__(self, token: str) -> None:
        from distributed import Event as ClusterEvent

        self._event = ClusterEvent(_cancel_name(token))
        self._checked, self._set = float("-inf"), False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked >= CANCEL_CHECK_SECONDS:
            self._checked, self._set = now, self._event.is_set()
        return self._set


def run_on_worker(job: WorkerJob) -> dict[str, Any]:
    from distributed import get_worker

    from samwatch.job.runner import JobRunner

    worker = get_worker()
    pool = worker_pool(worker, job.config)
    progress = Progress(_EventChannel(worker, job), _CancelFlag(job.token))
    identity = worker_identity("dask", str(worker.name))
    runner = JobRunner(job.config, _ResolvedWeights(job.spec), pool, job.config.models.prompt_batch_size, identity,
                       units=ClusterUnits(job.config, job.token))  # a tiled job's tiles spread over the cluster
    meter = PeakMeter()
    started_at = meter.start()
    outcome = runner.run(job.ticket, progress)
    outcome.worker = identity
    if outcome.error is not None:
        outcome.error = _as_the_worker_sees_it(outcome.error, job, str(worker.name))
    wire = outcome.to_wire()
    del outcome, runner
    # A worker lives as long as its batch job: what a big job used goes back to the node, as on
    # the local executor, instead of staying as the "unmanaged memory" Dask pauses workers for.
    if meter.worth_giving_back(started_at):
        give_back()
    return wire


def _as_the_worker_sees_it(error: JobError, job: WorkerJob, worker_name: str) -> JobError:
    """The daemon found the image before it sent the job, so a worker that finds none does not
    see the share where the config (and ``executor.path_map``) says it is: it says so."""
    image = job.ticket.image
    if error.code != "image_not_found" or image is None or error.file != image:
        return error
    where = job.config.inbox / image
    if where.exists():
        return error
    return JobError(
        "image_not_found",
        f"The Dask worker {worker_name} finds no file at {where}, where this job's image is for it. "
        f"Check that the worker mounts the share there, and executor.path_map ({job.config.executor.path_map or 'empty'}).",
        file=str(where),
    )


def worker_state(device: str = "auto", *, dask_worker: Any) -> dict[str, Any]:
    """Called through ``Client.run``, which passes the worker as ``dask_worker``; before its
    first job a worker reports the device ``device`` (``executor.device``) picks there."""
    from samwatch.models.device import DeviceUnavailable, describe, pick_devices

    pool = getattr(dask_worker, "_samwatch_pool", None)
    batch = {"slurm_job": os.environ["SLURM_JOB_ID"]} if os.environ.get("SLURM_JOB_ID") else {}
    if pool is not None:
        return {"device": describe(pool.device), "loaded_models": pool.loaded(), **batch}
    try:
        return {"device": describe(pick_devices(device)[0]), "loaded_models": [], **batch}
    except DeviceUnavailable as exc:
        return {"device": f"unavailable ({exc})", "loaded_models": [], **batch}


def evict_on_worker(changed: list[tuple[str, str]], dask_worker: Any) -> None:
    pool = getattr(dask_worker, "_samwatch_pool", None)
    if pool is not None:
        pool.evict({tuple(key) for key in changed})


# ---- helpers ------------------------------------------------------------------------------------


def _cancel_name(token: str) -> str:
    return f"samwatch-cancel-{token}"


def _outcome_of(future: Any) -> Outcome:
    if future.cancelled():
        return Outcome("cancelled", error=JobCancelled())
    try:
        body = future.result()
    except Exception as exc:  # noqa: BLE001 - a lost worker or a pickling problem: this job's failure
        return Outcome("failed", error=JobError(
            "internal_error", f"The cluster could not run the job ({type(exc).__name__}: {str(exc)[:200]}).",
        ))
    return Outcome.from_wire(body)


def _units_of_jobs(keys: Any, jobs_of_tokens: dict[str, str]) -> dict[str, int]:
    """The tiles or planes the scheduler has given a worker (running, or next there), counted by
    their job (keys ``UNIT_PREFIX-token-index``)."""
    units: dict[str, int] = {}
    for key in keys:
        if isinstance(key, str) and key.startswith(f"{UNIT_PREFIX}-"):
            job = jobs_of_tokens.get(key[len(UNIT_PREFIX) + 1:].rpartition("-")[0])
            if job is not None:
                units[job] = units.get(job, 0) + 1
    return units
