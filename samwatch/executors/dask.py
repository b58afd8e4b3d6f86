"""Jobs on a Dask cluster: an existing scheduler (``address``) or a dask-jobqueue cluster.

The daemon keeps everything but the run itself. Before dispatch it resolves the job's
weights (fetched and verified into ``state_dir``), so a worker only loads a file it can see
(``path_map`` rewrites prefixes for workers that mount the share elsewhere). Each worker
keeps a model pool between jobs (``_worker_pool``: keyed by type, weights and sha256).
Progress comes back as worker events (``log_event`` → ``subscribe_topic``); cancelling sets
a cluster-wide ``Event`` the job's ``Progress`` checks and cancels the future. A worker that
dies mid-job makes the scheduler run the task elsewhere; the daemon sees one result per
future, and the ledger's dispatch token drops anything older (see executors/base.py).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch.config import ClusterSettings, Config
from samwatch.errors import JobCancelled, JobError
from samwatch.executors.base import Dispatch, Event, Finished, ProgressReport
from samwatch.job_sidecar import load_job_sidecar
from samwatch.vocab import LoadSpec
from samwatch.vocab import JobTicket, Outcome, Progress

PROGRESS_TOPIC = "samwatch-progress"
#: a worker asks the scheduler whether its job was cancelled at most this often
CANCEL_CHECK_SECONDS = 0.5
WORKER_INFO_SECONDS = 2.0


class DaskExecutor:
    kind = "dask"

    def __init__(self, config: Config, registry: Any, *, client: Any = None) -> None:
        from distributed import Client

        self._config = config
        self._registry = registry
        settings = config.executor
        self._cluster = None
        if client is None:
            if settings.cluster is not None:
                self._cluster = start_jobqueue_cluster(settings.cluster)
                client = Client(self._cluster)
            else:
                client = Client(settings.address, timeout="30s")
        self.client = client
        self._events: queue.Queue[Event] = queue.Queue()
        self._futures: dict[str, tuple[Dispatch, Any]] = {}  # token -> (dispatch, future)
        self._immediate: list[Finished] = []
        self._worker_info: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        self.client.subscribe_topic(PROGRESS_TOPIC, self._on_event)
        logger.info(f"dask executor on {self.client.scheduler.address}")

    # ---- the seam ----------------------------------------------------------------------------

    def free_slots(self) -> int:
        threads = sum(self.client.nthreads().values())
        return max(1, threads) - len(self._futures)  # with none yet (adaptive), one job makes it scale up

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
        job = WorkerJob(_mapped_config(self._config), ticket, dispatch.token, _mapped_spec(spec, self._config.executor.path_map))
        future = self.client.submit(run_on_worker, job, key=f"samwatch-{dispatch.token}", pure=False)
        self._futures[dispatch.token] = (dispatch, future)

    def _resolve(self, ticket: JobTicket) -> LoadSpec | tuple[str, str]:
        if ticket.sidecar is None:
            raise JobError("image_not_found", "The job has no sidecar.")
        loaded = load_job_sidecar(self._config, ticket.sidecar)
        spec = self._registry.request(loaded.model_type, loaded.weights_name)
        if isinstance(spec, LoadSpec):
            return spec
        if spec.error is not None:
            raise spec.error
        return (loaded.model_type, loaded.weights_name)

    def poll(self, timeout: float = 0.0) -> list[Event]:
        events: list[Event] = list(self._immediate)
        self._immediate.clear()
        for token, (dispatch, future) in list(self._futures.items()):
            if future.done():
                del self._futures[token]
                events.append(Finished(dispatch.ticket.job_id, token, _outcome_of(future), _worker_of(future)))
        try:
            if not events and timeout > 0:
                events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            return events

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        message = event[1]
        self._events.put(ProgressReport(message["job"], message["token"], message["stage"], message["percent"], message["message"]))

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
            loaded = self.client.run(worker_state)
            processing = self.client.processing()
            scheduler = self.client.scheduler_info().get("workers", {})
        except Exception as exc:  # noqa: BLE001 - a cluster hiccup must not stop the status
            logger.warning(f"dask: cannot read the workers' state: {exc!r}")
            return info
        jobs = {f"samwatch-{token}": dispatch.ticket.job_id for token, (dispatch, _) in self._futures.items()}
        info = [
            {
                "name": str(scheduler.get(address, {}).get("name", address)),
                "host": scheduler.get(address, {}).get("host", address),
                "device": state["device"],
                "memory_mb": round(scheduler.get(address, {}).get("metrics", {}).get("memory", 0) / 2**20),
                "loaded_models": state["loaded_models"],
                "job": next((jobs[key] for key in processing.get(address, ()) if key in jobs), None),
            }
            for address, state in sorted(loaded.items())
        ]
        self._worker_info = (time.monotonic(), info)
        return info

    def reconfigure(self, config: Config, changed: set[tuple[str, str]]) -> None:
        self._config = config
        if changed:
            self.client.run(evict_on_worker, sorted(changed))

    def map_units(self, fn: Callable[[Any], Any], units: Iterable[Any]) -> list[Any]:
        """Each unit a task on the cluster; from inside a job, call it through ``worker_client``."""
        return self.client.gather(self.client.map(fn, list(units), pure=False))

    def close(self) -> None:
        for token in list(self._futures):
            self._futures[token][1].release()
        self._futures.clear()
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def start_jobqueue_cluster(settings: ClusterSettings) -> Any:
    import dask_jobqueue

    kinds = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
    cluster = getattr(dask_jobqueue, kinds[settings.kind])(**jobqueue_arguments(settings))
    cluster.adapt(minimum=settings.adapt_minimum, maximum=settings.adapt_maximum)
    return cluster


def jobqueue_arguments(settings: ClusterSettings) -> dict[str, Any]:
    """The dask-jobqueue constructor's keywords for ``settings`` (one worker process per job)."""
    directives = list(settings.extra_directives)
    if settings.gpus and settings.kind == "slurm":
        directives.append(f"--gres=gpu:{settings.gpus}")
    arguments: dict[str, Any] = {
        "cores": settings.cores, "memory": settings.memory, "processes": 1,
        "job_extra_directives": directives,
    }
    if settings.queue is not None:
        arguments["queue"] = settings.queue
    if settings.walltime is not None:
        arguments["walltime"] = settings.walltime
    return arguments


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


def _worker_pool(worker: Any, config: Config) -> Any:
    """This worker's model pool, kept between jobs (on the worker object: one per process)."""
    from samwatch.models.device import pick_devices
    from samwatch.models.pool import ModelPool

    pool = getattr(worker, "_samwatch_pool", None)
    if pool is None:
        device = pick_devices(config.executor.device)[0]
        pool = ModelPool(device, config.models, cache_dir=config.state_dir / "encoders")
        worker._samwatch_pool = pool
    return pool


def run_on_worker(job: WorkerJob) -> dict[str, Any]:
    from distributed import get_worker

    from samwatch.jobs import JobRunner

    worker = get_worker()
    pool = _worker_pool(worker, job.config)
    progress = Progress(_EventChannel(worker, job), _CancelFlag(job.token))
    runner = JobRunner(job.config, _ResolvedWeights(job.spec), pool, job.config.models.prompt_batch_size)
    outcome = runner.run(job.ticket, progress)
    return outcome.to_wire() | {"worker": worker.address}


def worker_state(dask_worker: Any) -> dict[str, Any]:
    """Called through ``Client.run``, which passes the worker as ``dask_worker``."""
    from samwatch.models.device import describe

    pool = getattr(dask_worker, "_samwatch_pool", None)
    if pool is None:
        return {"device": "not used yet", "loaded_models": []}
    return {"device": describe(pool.device), "loaded_models": pool.loaded()}


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


def _worker_of(future: Any) -> str:
    try:
        return future.result()["worker"] if future.status == "finished" else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _map_path(path: Path, path_map: dict[str, str]) -> Path:
    text = str(path)
    for source, target in path_map.items():
        if text == source or text.startswith(source.rstrip("/") + "/"):
            return Path(target.rstrip("/") + text[len(source.rstrip("/")):])
    return path


def _mapped_config(config: Config) -> Config:
    path_map = config.executor.path_map
    if not path_map:
        return config
    return config.model_copy(update={
        "inbox": _map_path(config.inbox, path_map), "state_dir": _map_path(config.state_dir, path_map),
    })


def _mapped_spec(spec: LoadSpec, path_map: dict[str, str]) -> LoadSpec:
    from dataclasses import replace

    return replace(spec, checkpoint=_map_path(Path(spec.checkpoint), path_map)) if path_map else spec
