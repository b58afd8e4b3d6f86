"""The dashboard page, loaded by a real browser (headless Chromium) from file://."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samwatch.atomic import now_iso
from samwatch.control.dashboard import PAGE, RecentResults, dashboard_page

EVIL = 'x<script>alert("hi")<'  # a legal file name that must stay text


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (apt-get install chromium; .ci/run installs it where missing)")


def browse(page: Path, *args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--allow-file-access-from-files", "--window-size=1280,1400", *args, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# Run in the page by a copy of it (the dashboard itself has no script): what a person sees.
PROBE = """<script>
window.addEventListener("load", () => {
  const rows = id => document.querySelectorAll("#" + id + " tr").length - 1;
  const bars = [...document.querySelectorAll(".bar")].map(bar =>
      bar.querySelector(".fill").getBoundingClientRect().width / bar.getBoundingClientRect().width);
  const thumbs = [...document.querySelectorAll("img.thumb")].map(img => [img.complete, img.naturalWidth]);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({rows: {daemons: rows("daemons"), running: rows("running"),
      results: rows("results"), failures: rows("failures")}, bars, thumbs,
      scripts: document.scripts.length, names: [...document.querySelectorAll("#results td:nth-child(2)")]
      .map(td => td.textContent)});
  document.body.appendChild(out);
});
</script>"""


def test_dashboard_in_a_browser(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    status_dir = outbox / "_samwatch"
    (status_dir / "instances").mkdir(parents=True)
    recent = RecentResults()
    jobs = ["exp1/img001", "exp1/img 002 (copy)", f"exp2/{EVIL}"]
    for index, job in enumerate(jobs):
        path = outbox / f"{job}.preview.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((60, 80, 3), 60 * index, np.uint8)).save(path)
        (outbox / f"{job}.geojson").write_text("{}")
        recent.add(job, features=index + 1, seconds=1.5, preview=True, labels=index == 0)
    recent.add("exp3/no-preview", features=0, seconds=0.2, preview=False, labels=False)
    status = {
        "state": "running", "version": "t", "instance": "gpu-1", "pid": 1, "updated": now_iso(), "heartbeat_seconds": 5,
        "device": "cuda:0", "inbox": "/srv/inbox", "queue": {"queued": 12, "waiting": 1},
        "running": [{"job": "exp4/big", "stage": "automask", "percent": 37, "seconds": 12.0},
                    {"job": f"exp4/{EVIL}", "stage": "tracking", "percent": 80, "seconds": 3.0}],
        "recent_failures": [{"job": f"exp5/{EVIL}", "error": "image_unreadable", "message": "<b>bad</b> file",
                             "at": now_iso()}],
        "recent_results": recent.listing(),
    }
    other = {"state": "idle", "version": "t", "instance": "gpu-2", "updated": "2020-01-01T00:00:00+00:00",
             "heartbeat_seconds": 5, "device": "cpu", "queue": {"queued": 0, "waiting": 0}, "current": None,
             "recent_results": [{"job": "exp9/other", "features": 4, "seconds": 1, "at": now_iso(), "preview": False}]}
    (status_dir / "instances" / "gpu-2.json").write_text(json.dumps(other))
    (status_dir / PAGE).write_text(dashboard_page(status_dir, status))
    page = status_dir / PAGE
    html = page.read_text()
    assert "<script" not in html and EVIL not in html and "&lt;script&gt;" in html
    assert 'http-equiv="refresh"' in html and "http://" not in html and "https://" not in html

    probe = status_dir / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = browse(probe, "--virtual-time-budget=3000", "--dump-dom")
    found = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"')
                       .replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert found["rows"] == {"daemons": 2, "running": 2, "results": 5, "failures": 1}
    assert found["bars"] == pytest.approx([0.37, 0.80], abs=0.01)
    assert found["thumbs"] == [[True, 80]] * 3, "every preview thumbnail loads over file://"
    assert found["scripts"] == 1, "only the probe runs: the file name stayed text"
    assert sorted(found["names"]) == sorted([*jobs, "exp3/no-preview", "exp9/other"]), "all daemons' results, as text"

    shot = tmp_path / "dashboard.png"
    browse(page, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
