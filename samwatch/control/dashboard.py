"""``outbox/_samwatch/index.html``: what the daemons on this outbox are doing, for a browser.

Regenerated atomically with every heartbeat; it opens from the share over file:// with no
server and no external assets, and reloads itself (meta refresh). It shows each daemon's
state (``_samwatch/instances/*.json``), the queue, running jobs with progress bars, the last
results with their preview thumbnails and relative links, and recent failures. Every name
from the file system is HTML-escaped (and URL-quoted in links).

Cost per heartbeat stays small and independent of the outbox's size: nothing is scanned.
Results come from a bounded list fed by job outcomes (:class:`RecentResults`); each daemon
publishes its list in its heartbeat file (``recent_results``), so with several daemons on a
share every page shows all of their results.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from samwatch.atomic import now_iso
from samwatch.control.outbox import LABELS_SUFFIX, PREVIEW_SUFFIX

RECENT_RESULTS = 50
RECENT_FAILURES = 20
PAGE = "index.html"

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
th{background:#eee}.muted{color:#777}.stale{color:#b00;font-weight:bold}.err{color:#b00}
.bar{width:200px;height:12px;background:#ddd;border-radius:3px;overflow:hidden}
.fill{height:100%;background:#3a7bd5}
.thumb{max-width:160px;max-height:120px;display:block}
""".strip()


def _text(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _href(job: str, suffix: str) -> str:
    """A link from ``_samwatch/index.html`` to the job's file in the outbox."""
    return escape("../" + quote(f"{job}{suffix}", safe="/"), quote=True)


def _age_seconds(iso: str | None) -> float | None:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(str(iso))).total_seconds()
    except (TypeError, ValueError):
        return None


def is_stale(status: dict[str, Any]) -> bool:
    """No heartbeat for three beats (plus slack): the daemon is gone or hung (a clean stop,
    ``"state": "stopped"``, is not)."""
    if status.get("state") == "stopped":
        return False
    age = _age_seconds(status.get("updated"))
    return age is None or age > 3 * float(status.get("heartbeat_seconds") or 5) + 5


def read_instances(folder: Path, own: dict[str, Any]) -> list[dict[str, Any]]:
    """Every daemon's last heartbeat, ``own`` (this beat's, not yet on disk) first."""
    found = [own]
    for path in sorted(folder.glob("*.json")):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or not ours
        if isinstance(other, dict) and other.get("instance") != own.get("instance"):
            found.append(other)
    return found


def running_jobs(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs a daemon runs: ``running`` (several slots) or ``current`` (one)."""
    running = status.get("running")
    if isinstance(running, list):
        return [job for job in running if isinstance(job, dict)]
    current = status.get("current")
    return [current] if isinstance(current, dict) else []


def _percent(job: dict[str, Any]) -> float:
    try:
        return max(0.0, min(100.0, float(job.get("percent") or 0)))
    except (TypeError, ValueError):
        return 0.0


class RecentResults:
    """This daemon's last results, newest first, one per job: fed by job outcomes, published
    in its heartbeat file (``recent_results``) for the page."""

    def __init__(self, keep: int = RECENT_RESULTS) -> None:
        self.keep = keep
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, job: str, *, features: int | None, seconds: float | None, preview: bool, labels: bool,
            at: str | None = None) -> None:
        """``features``/``seconds`` None: a result of an earlier run, known from the ledger only."""
        self._results.pop(job, None)
        self._results[job] = {
            "job": job, "features": features, "seconds": None if seconds is None else round(seconds, 2),
            "at": at or now_iso(), "preview": preview, "labels": labels,
        }
        while len(self._results) > self.keep:
            self._results.popitem(last=False)

    def discard(self, job: str) -> None:
        """Its result was removed (a newer version failed): no dead link on the page."""
        self._results.pop(job, None)

    def listing(self) -> list[dict[str, Any]]:
        return list(reversed(self._results.values()))


def dashboard_page(state_folder: Path, status: dict[str, Any]) -> str:
    """``index.html`` for this beat's ``status`` and the other daemons' heartbeat files."""
    return render(read_instances(state_folder / "instances", status))


def render(instances: list[dict[str, Any]]) -> str:
    """The whole page for these daemons' heartbeats (the first is the writer's)."""
    own = instances[0]
    refresh = max(2, round(float(own.get("heartbeat_seconds") or 5)))
    results = sorted(
        (item for status in instances for item in status.get("recent_results") or [] if isinstance(item, dict)),
        key=lambda item: str(item.get("at", "")), reverse=True,
    )[:RECENT_RESULTS]
    failures = sorted(
        (dict(item, instance=status.get("instance")) for status in instances
         for item in status.get("recent_failures") or [] if isinstance(item, dict)),
        key=lambda item: str(item.get("at", "")), reverse=True,
    )[:RECENT_FAILURES]
    running = [dict(job, instance=status.get("instance")) for status in instances for job in running_jobs(status)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{refresh}">',
        "<title>samwatch</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>samwatch</h1>",
        f'<p class="muted">{_text(own.get("inbox"))} &rarr; this outbox. Written {_text(own.get("updated"))}; '
        f"reloads every {refresh} s.</p>",
        _daemons(instances),
        _workers(instances),
        _running(running),
        _results(results),
        _failures(failures),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(section: str, head: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<h2>{section}</h2>\n<p class="muted" id="{section.lower().split()[0]}-empty">{empty}</p>'
    header = "".join(f"<th>{cell}</th>" for cell in head)
    body = "\n".join(rows)
    return f'<h2>{section}</h2>\n<table id="{section.lower().split()[0]}"><tr>{header}</tr>\n{body}\n</table>'


def _daemons(instances: list[dict[str, Any]]) -> str:
    rows = []
    for status in instances:
        queue = status.get("queue") or {}
        stale = is_stale(status)
        state = '<span class="stale">not responding</span>' if stale else _text(status.get("state"))
        config_error = (status.get("config") or {}).get("error")
        rows.append(
            "<tr>"
            f"<td>{_text(status.get('instance'))}</td><td>{state}</td><td>{_text(status.get('device'))}</td>"
            f"<td>{_text(queue.get('queued', 0))}</td><td>{_text(queue.get('waiting', 0))}</td>"
            f"<td>{_text(status.get('updated'))}</td><td>{_text(status.get('version'))}</td>"
            f"<td class=\"err\">{_text(config_error) if config_error else ''}</td></tr>"
        )
    return _table("Daemons", ["daemon", "state", "device", "queued", "waiting for weights", "heartbeat", "version",
                              "config error"], rows, "no daemon")


def _workers(instances: list[dict[str, Any]]) -> str:
    """Each slot's memory: resident now, and the peak while its last job was on the device."""
    rows = []
    for status in instances:
        for worker in status.get("workers") or []:
            if not isinstance(worker, dict):
                continue
            peak = worker.get("last_job_peak_mb")
            units = ", ".join(f"{count} of {job}" for job, count in (worker.get("units") or {}).items())
            rows.append(
                f"<tr><td>{_text(worker.get('name'))}</td><td>{_text(status.get('instance'))}</td>"
                f"<td>{_text(worker.get('device'))}</td><td>{_text(worker.get('rss_mb', worker.get('memory_mb')))} MB</td>"
                f"<td>{_text(peak) + ' MB' if peak is not None else ''}</td><td>{_text(worker.get('job') or '')}</td>"
                f"<td>{_text(units)}</td></tr>"
            )
    return _table("Workers", ["worker", "daemon", "device", "memory now", "last job's peak", "job", "tiles/planes"],
                  rows, "no workers")


def _running(jobs: list[dict[str, Any]]) -> str:
    rows = []
    for job in jobs:
        percent = _percent(job)
        rows.append(
            f"<tr><td>{_text(job.get('job'))}</td><td>{_text(job.get('instance'))}</td><td>{_text(job.get('stage'))}</td>"
            f'<td><div class="bar"><div class="fill" style="width:{percent:.0f}%"></div></div></td>'
            f"<td>{percent:.0f}%</td><td>{_text(job.get('seconds'))} s</td></tr>"
        )
    return _table("Running", ["job", "daemon", "stage", "progress", "%", "time"], rows, "nothing running")


def _results(results: list[dict[str, Any]]) -> str:
    rows = []
    for item in results:
        job = str(item.get("job", ""))
        thumb = (
            f'<a href="{_href(job, PREVIEW_SUFFIX)}"><img class="thumb" src="{_href(job, PREVIEW_SUFFIX)}" '
            f'alt="preview of {_text(job)}"></a>' if item.get("preview") else '<span class="muted">no preview</span>'
        )
        links = f'<a href="{_href(job, ".geojson")}">GeoJSON</a>'
        if item.get("labels"):
            links += f' &middot; <a href="{_href(job, LABELS_SUFFIX)}">labels</a>'
        rows.append(
            f"<tr><td>{thumb}</td><td>{_text(job)}</td><td>{_text(item.get('features'))}</td>"
            f"<td>{links}</td><td>{_took(item.get('seconds'))}</td><td>{_text(item.get('at'))}</td></tr>"
        )
    return _table("Results", ["preview", "job", "features", "files", "took", "finished"], rows, "no results yet")


def _failures(failures: list[dict[str, Any]]) -> str:
    rows = [
        f"<tr><td>{_text(item.get('job'))}</td><td>{_text(item.get('error'))}</td>"
        f"<td>{_text(item.get('message'))}</td><td>{_text(item.get('at'))}</td>"
        f"<td><a href=\"{_href(str(item.get('job', '')), '.error.json')}\">error file</a></td></tr>"
        for item in failures
    ]
    return _table("Failures", ["job", "error", "message", "when", "file"], rows, "no recent failures")


def _took(seconds: Any) -> str:
    return "" if seconds is None else f"{_text(seconds)} s"
