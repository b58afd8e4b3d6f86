"""The batch-system cluster a Dask executor starts itself (dask-jobqueue: Slurm, PBS, SGE, LSF).

Adapt asks the batch system for worker jobs by the work the scheduler holds (the executor keeps
enough in flight, see ``DaskExecutor.in_flight_limit``) and gives idle ones back. Each worker job
runs the cluster block's Python with its env and prologue, so the daemon's interpreter path
need not exist on the compute nodes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from samwatch.config import ClusterSettings

#: the scheduler's name for the group of samwatch's tasks (the key up to the token)
TASK_PREFIX = "samwatch"
#: what adapt assumes a job takes until one has run
ASSUMED_JOB_DURATION = "10s"


def start_jobqueue_cluster(settings: ClusterSettings, log_directory: Path) -> Any:
    import dask
    import dask_jobqueue

    # Adapt sizes the cluster by the work it holds, timed by what such tasks took before; a cold
    # cluster has no timing yet and would guess 0.5 s a job, asking for one worker whatever the queue.
    dask.config.set({f"distributed.scheduler.default-task-durations.{TASK_PREFIX}": ASSUMED_JOB_DURATION})

    kinds = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
    arguments = jobqueue_arguments(settings) | {"log_directory": str(log_directory)}  # not the daemon's cwd
    cluster = getattr(dask_jobqueue, kinds[settings.kind])(**arguments)
    cluster.adapt(Adaptive=_idle_first_adaptive(), minimum=settings.adapt_minimum, maximum=settings.adapt_maximum)
    logger.info(f"{settings.kind} cluster: adapt {settings.adapt_minimum}..{settings.adapt_maximum} worker jobs "
                f"of {settings.cores} cores, python {arguments.get('python', sys.executable)}")
    return cluster


def _idle_first_adaptive() -> type:
    """Dask's ``Adaptive``, giving back only idle workers: the stock one closes busy ones too when
    its target dips between two jobs (a new worker was seen killed a second after it took a job),
    and the job then runs again from the start elsewhere."""
    from distributed.deploy import Adaptive

    class IdleFirstAdaptive(Adaptive):
        async def workers_to_close(self, target: int) -> list[str]:
            names = await super().workers_to_close(target)
            scheduler = getattr(self.cluster, "scheduler", None)  # in this process for a jobqueue cluster
            workers = getattr(scheduler, "workers", None)
            if not isinstance(workers, dict):
                return names
            busy = {str(state.name) for state in workers.values() if state.processing}
            return [name for name in names if str(name) not in busy]

    return IdleFirstAdaptive


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
    if settings.worker_python is not None:  # the daemon's interpreter path need not exist on the nodes
        arguments["python"] = settings.worker_python
    prologue = [f"source {shlex.quote(settings.venv.rstrip('/') + '/bin/activate')}"] if settings.venv else []
    prologue += [f"export {name}={shlex.quote(value)}" for name, value in settings.env.items()]
    prologue += settings.prologue
    if prologue:
        arguments["job_script_prologue"] = prologue
    return arguments
