"""A plain install (no extras): the daemon starts, and what needs an extra says which one.

``without_extras.py`` hides the extras' modules from the import system, as a plain
``./install.sh`` environment lacks them; .ci/first_run.sh checks a real plain install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from slides import dense_slide, write_ome_pyramid, write_svs
from support import fake_weights, read_json, write_config, write_sidecar

pytestmark = pytest.mark.subprocess  # each test runs `samwatch run --once` in a process without the extras

WRAPPER = Path(__file__).with_name("without_extras.py")
EXTRAS = "openslide,tiffslide,dask,distributed,dask_jobqueue"


def run_without_extras(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAMWATCH_TEST_ABSENT": EXTRAS, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(WRAPPER), "run", "--config", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_daemon_without_extras_reads_ome_tiff_slides_and_names_the_slides_extra_for_svs(tmp_path):
    config = write_config(tmp_path, fake_weights(tmp_path))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    content = dense_slide(600, 800)
    write_ome_pyramid(inbox / "tiled.ome.tif", content, levels=2, tile=256)
    write_sidecar(inbox / "tiled.yaml", {"model": "vit_t", "prompts": [{"bbox": [10, 10, 100, 90]}]})
    write_svs(inbox / "vendor.svs", content, levels=2)
    write_sidecar(inbox / "vendor.yaml", {"model": "vit_t", "prompts": [{"bbox": [10, 10, 100, 90]}]})

    done = run_without_extras(config, "--once")

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr  # one job failed
    assert (outbox / "tiled.geojson").is_file(), done.stderr
    error = read_json(outbox / "vendor.error.json")
    assert error["error"] == "extra_not_installed"
    assert "pip install 'samwatch[slides]'" in error["message"]


def test_dask_config_without_the_dask_extra_is_a_config_error_naming_it(tmp_path):
    config = write_config(tmp_path, fake_weights(tmp_path), executor={"kind": "dask", "address": "tcp://127.0.0.1:1"})
    refused = run_without_extras(config, "--once")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr, refused.stderr
    assert "executor.kind: needs distributed" in refused.stderr
    assert "pip install 'samwatch[dask]'" in refused.stderr

    cluster = {"kind": "slurm", "queue": "gpu", "cores": 1, "memory": "1GB"}
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "executor": {"kind": "dask", "cluster": cluster}}))
    refused = run_without_extras(config, "--once")
    assert refused.returncode == 2 and "executor.cluster: needs" in refused.stderr, refused.stderr
