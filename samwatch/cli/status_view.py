"""``samwatch status`` for people: a table with progress bars on a terminal, plain lines otherwise.

The input is a heartbeat (``_samwatch/status.json``) plus the other daemons' heartbeats on
the same outbox; ``--json`` bypasses this module and prints the heartbeat itself.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from samwatch.control.dashboard import is_stale, running_jobs


def _last_peak(worker: dict[str, Any]) -> str:
    peak = worker.get("last_job_peak_mb")
    return f" (last job's peak {peak} MB)" if peak is not None else ""


def _models(status: dict[str, Any]) -> str:
    return ", ".join(f"{m.get('type')}/{m.get('weights')}" for m in status.get("loaded_models", [])) or "none"


def _totals(status: dict[str, Any]) -> str:
    totals = status.get("totals") or {}
    line = (f"jobs: {totals.get('done', 0)} done, {totals.get('failed', 0)} failed, "
            f"{totals.get('queued', 0)} queued")
    if "done_this_run" in totals:
        line += f" (since start: {totals['done_this_run']} done, {totals.get('failed_this_run', 0)} failed)"
    return line


def render_plain(status: dict[str, Any], age: float, stale: bool, others: list[dict[str, Any]]) -> str:
    lines = [
        f"samwatch {status['version']} on {status['instance']} (pid {status['pid']}), device {status['device']}",
        f"state: {status['state']}; last heartbeat {age:.0f} s ago"
        + ("  -- STALE: the daemon is not running or is hung" if stale else ""),
    ]
    queue = status["queue"]
    lines.append(f"queue: {queue['queued']} queued, {queue['waiting']} waiting for weights")
    lines.append(_totals(status))
    executor = status.get("executor", {})
    lines.append(f"executor: {executor.get('kind', 'local')}, {executor.get('slots', 1)} slot(s)")
    for worker in status.get("workers", []):
        lines.append(f"  worker {worker.get('name')} on {worker.get('host')} {worker.get('device')}, "
                     f"{worker.get('memory_mb')} MB{_last_peak(worker)}, {_models(worker) if worker.get('loaded_models') else 'no models'}, "
                     f"{_tally(worker)}")
    for job in running_jobs(status):
        lines.append(f"running: {job['job']} {job['stage']} {job['percent']}% ({job['seconds']} s)")
    lines.append(f"loaded models: {_models(status)}")
    for download in status.get("downloads", []):
        lines.append(f"downloading: {download.get('type')}/{download.get('name')} {download.get('percent', 0):.0f}%")
    if status.get("config", {}).get("error"):
        lines.append(f"config error (old config in force): {status['config']['error']}")
    for other in others:
        state = "not responding" if is_stale(other) else other.get("state", "?")
        lines.append(f"other daemon on this outbox: {other.get('instance')}: {state}, heartbeat {other.get('updated')}")
    failures = status.get("recent_failures", [])
    if failures:
        lines.append("recent failures (when, job: error: message):")
        lines.extend(f"  {f['at']} {f['job']}: {f['error']}: {f['message']}" for f in failures[-10:])
    return "\n".join(lines)


def _cells(*values: Any) -> list[Any]:
    """Table cells as plain text: a job name like "[red]x" must not be read as rich markup."""
    from rich.text import Text

    return [Text("" if value is None else str(value)) for value in values]


def _bar(percent: float) -> Any:
    from rich.progress_bar import ProgressBar

    return ProgressBar(total=100, completed=max(0.0, min(100.0, float(percent or 0))), width=24)


def render_tables(status: dict[str, Any], age: float, stale: bool, others: list[dict[str, Any]]) -> list[Any]:
    """The same content as :func:`render_plain`, as rich renderables."""
    from rich.table import Table
    from rich.text import Text

    daemons = Table(title="samwatch daemons on this outbox", title_justify="left")
    for column in ("daemon", "state", "device", "queued", "waiting", "heartbeat"):
        daemons.add_column(column)
    state = Text("STALE: not running or hung", style="bold red") if stale else Text(str(status["state"]))
    daemons.add_row(
        *_cells(status["instance"]), state,
        *_cells(status["device"], status["queue"]["queued"], status["queue"]["waiting"], f"{age:.0f} s ago"),
    )
    for other in others:
        other_state = Text("not responding", style="red") if is_stale(other) else Text(str(other.get("state", "?")))
        queue = other.get("queue") or {}
        daemons.add_row(
            *_cells(other.get("instance")), other_state,
            *_cells(other.get("device", ""), queue.get("queued", ""), queue.get("waiting", ""), other.get("updated", "")),
        )
    out: list[Any] = [daemons, Text(_totals(status))]
    workers = status.get("workers", [])
    if workers:
        table = Table(title=f"workers ({status.get('executor', {}).get('kind', 'local')} executor)", title_justify="left")
        for column in ("worker", "host", "device", "memory", "models", "jobs"):
            table.add_column(column)
        for worker in workers:
            table.add_row(*_cells(worker.get("name"), worker.get("host"), worker.get("device"),
                                  f"{worker.get('memory_mb')} MB{_last_peak(worker)}", _models(worker), _tally(worker)))
        out.append(table)
    out.append(Text(f"loaded models: {_models(status)}"))
    jobs = [(status["instance"], job) for job in running_jobs(status)]
    jobs += [(other.get("instance"), job) for other in others for job in running_jobs(other)]
    downloads = status.get("downloads", [])
    if jobs or downloads:
        running = Table(title="running", title_justify="left")
        for column in ("job", "daemon", "stage", "progress", "%", "time"):
            running.add_column(column)
        for instance, job in jobs:
            running.add_row(*_cells(job.get("job"), instance, job.get("stage")), _bar(job.get("percent")),
                            *_cells(job.get("percent", 0), f"{job.get('seconds', '')} s"))
        for download in downloads:
            running.add_row(*_cells(f"weights {download.get('type')}/{download.get('name')}", status["instance"],
                                    "downloading"), _bar(download.get("percent")),
                            *_cells(f"{download.get('percent', 0):.0f}", ""))
        out.append(running)
    if status.get("config", {}).get("error"):
        out.append(Text(f"config error (old config in force): {status['config']['error']}", style="red"))
    failures = status.get("recent_failures", [])
    if failures:
        table = Table(title="recent failures", title_justify="left")
        for column in ("when", "job", "error", "message"):
            table.add_column(column, overflow="fold")
        for failure in failures[-10:]:
            table.add_row(*_cells(failure.get("at"), failure.get("job"), failure.get("error"), failure.get("message")))
        out.append(table)
    return out


def print_status(
    status: dict[str, Any], age: float, stale: bool, others: list[dict[str, Any]], *,
    stream: TextIO | None = None, terminal: bool | None = None,
) -> None:
    stream = stream or sys.stdout
    if not (stream.isatty() if terminal is None else terminal):
        print(render_plain(status, age, stale, others), file=stream)
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=stream, force_terminal=True, highlight=False)
    console.print(Text(f"samwatch {status['version']} (pid {status['pid']})", style="bold"))
    for renderable in render_tables(status, age, stale, others):
        console.print(renderable)


def _tally(worker: dict[str, Any]) -> str:
    """What a slot or cluster worker finished since start (and its Slurm job, if it runs in one),
    and the tiles or planes of spread jobs the scheduler has given it now."""
    slurm = f", Slurm job {worker['slurm_job']}" if worker.get("slurm_job") else ""
    units = "".join(f", {count} tiles/planes of {job}" for job, count in (worker.get("units") or {}).items())
    return f"{worker.get('done', 0)} done, {worker.get('failed', 0)} failed{slurm}{units}"
