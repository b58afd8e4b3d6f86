"""load_job_sidecar: the one reading of a sidecar (folder defaults, samapi bodies, weights, mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samwatch.config import Config, WeightsEntry
from samwatch.errors import JobError
from samwatch.families import DEFAULT_WEIGHT_URLS, FAMILIES, MODEL_TYPES, mode_advice
from samwatch.control.discovery import folder_defaults, nearest_defaults, split_name
from samwatch.control.watcher import scan_tree
from samwatch.sidecars.load import JobSidecar, load_job_sidecar

LAB_URL = "https://example.org/lab_vit_b.pth"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "inbox").mkdir()
    lab = WeightsEntry(name="lab", type="vit_b", url=LAB_URL)
    return Config(inbox=tmp_path / "inbox", weights=[lab])


def load(config: Config, rel: str, **options) -> JobSidecar:
    """``rel`` as its job reads it: with the folder defaults discovery finds among the inbox's files."""
    defaults = nearest_defaults(split_name(rel)[0], folder_defaults(scan_tree(config.inbox)))
    return load_job_sidecar(config, rel, defaults=defaults, **options)


def write(config: Config, rel: str, body: dict) -> str:
    path = config.inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return rel


def test_the_families_table_derives_types_and_defaults() -> None:
    assert MODEL_TYPES == tuple(t for family in FAMILIES for t in family.default_urls)
    assert set(DEFAULT_WEIGHT_URLS) == set(MODEL_TYPES)
    assert "sam3" in mode_advice("text") and "vit_t" not in mode_advice("text")


def test_folder_defaults_fill_what_the_sidecar_leaves_unset(config: Config) -> None:
    write(config, "exp/samwatch.yaml", {"model": "vit_b", "priority": 7, "label": "cell"})
    rel = write(config, "exp/sub/a.json", {"prompts": [{"bbox": [1, 2, 3, 4]}], "label": "own"})
    loaded = load(config, rel)
    assert (loaded.model_type, loaded.priority, loaded.sidecar.label, loaded.defaults_rel) == (
        "vit_b", 7, "own", "exp/samwatch.yaml"
    )


def test_a_checkpoint_url_selects_the_registered_entry(config: Config) -> None:
    qupath = {"type": "vit_t", "bbox": [1, 2, 30, 40], "checkpoint_url": DEFAULT_WEIGHT_URLS["vit_t"]}
    assert load(config, write(config, "q.json", qupath)).weights_name == "default"
    lab = {"type": "vit_b", "bbox": [1, 2, 30, 40], "checkpoint_url": LAB_URL}
    assert load(config, write(config, "l.json", lab)).weights_name == "lab"


def test_another_checkpoint_url_is_refused_naming_weights_add(config: Config) -> None:
    body = {"type": "vit_t", "bbox": [1, 2, 30, 40], "checkpoint_url": "https://evil.example/x.pt"}
    with pytest.raises(JobError) as refused:
        load(config, write(config, "x.json", body))
    assert refused.value.code == "checkpoint_url_refused" and refused.value.field == "checkpoint_url"
    assert "samwatch weights add" in refused.value.message


def test_samapi_nulls_mean_absent_and_qupath_spellings_are_accepted(config: Config) -> None:
    body = {
        "type": "vit_t", "bbox": [1, 2, 30, 40], "point_coords": None, "point_labels": None, "b64mask": None,
        "multimask_output": None, "checkpoint_url": None, "output_type": "single MASK",
    }
    sidecar = load(config, write(config, "n.json", body)).sidecar
    assert sidecar.prompts[0].bbox == (1, 2, 30, 40) and sidecar.mask_choice == "single"
    automask = {"type": "vit_t", "points_per_side": 8, "output_type": "Multi-mask (Best Quality)", "include_image_edge": None}
    assert load(config, write(config, "a.json", automask)).sidecar.mask_choice == "best"


def test_the_mode_check_comes_from_the_table(config: Config) -> None:
    rel = write(config, "s.json", {"model": "sam3", "prompts": [{"bbox": [1, 2, 3, 4]}]})
    with pytest.raises(JobError) as refused:
        load(config, rel)
    assert refused.value.code == "sidecar_invalid" and refused.value.field == "model"
    collected: list[JobError] = []
    load(config, rel, problems=collected)
    assert [problem.field for problem in collected] == ["model"]
