"""Regions and tiles through the real job pipeline with a random-weight vit_t."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samwatch.config import Config
from samwatch.geometry import iou, rasterize
from samwatch.jobs import JobRunner
from samwatch.models.pool import ModelPool
from samwatch.weights.registry import WeightsRegistry
from samwatch.outbox import JobOutputs
from samwatch.vocab import JobTicket, Progress
from support import coins

REGION = (1700, 1400, 384, 303)  # where coins() lies in the big image


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, vit_t_checkpoint: Path) -> JobRunner:
    root = tmp_path_factory.mktemp("tiling-jobs")
    config = Config(inbox=root / "inbox", outbox=root / "outbox", state_dir=root / "state",
                    weights=[{"name": "default", "type": "vit_t", "path": str(vit_t_checkpoint)}])
    config.inbox.mkdir()
    registry = WeightsRegistry(config.weights, config.state_dir)
    return JobRunner(config, registry, ModelPool(torch.device("cpu"), config.models), prompt_batch_size=1)


def _job(runner: JobRunner, stem: str, image: np.ndarray, body: dict) -> dict:
    inbox = runner.config.inbox
    Image.fromarray(image).save(inbox / f"{stem}.png")
    (inbox / f"{stem}.yaml").write_text(yaml.safe_dump(body))
    outputs = JobOutputs(runner.config.outbox, stem)
    outcome = runner.run(JobTicket(stem, f"{stem}.yaml", f"{stem}.png", f"sha-{stem}", "v1"),
                         Progress(outputs, threading.Event()))
    assert outcome.state == "done", outcome.error
    return outcome.result


def _big_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 60, (2000, 2400), dtype=np.uint8)
    x, y, w, h = REGION
    big[y:y + h, x:x + w] = coins()
    return big


def _masks(result: dict, shape: tuple[int, int], key: str) -> dict:
    return {f["properties"][key]: rasterize(f["geometry"], shape) for f in result["features"]}


def test_a_region_equals_the_cut_out_image_shifted(runner: JobRunner) -> None:
    x, y, w, h = REGION
    local_prompts = [{"bbox": [40, 40, 120, 110]}, {"points": [[200, 150], [30, 30]], "point_labels": [1, 0]},
                     {"bbox": [250, 180, 360, 290]}]
    shifted = [
        {**p, **({"bbox": [p["bbox"][0] + x, p["bbox"][1] + y, p["bbox"][2] + x, p["bbox"][3] + y]} if "bbox" in p else {}),
         **({"points": [[px + x, py + y] for px, py in p["points"]]} if "points" in p else {})}
        for p in local_prompts
    ]
    plain = _job(runner, "cut", coins(), {"model": "vit_t", "prompts": local_prompts})
    region = _job(runner, "big", _big_image(), {"model": "vit_t", "region": list(REGION), "prompts": shifted})
    assert region["samwatch"]["tiling"]["region"] == list(REGION)
    assert region["samwatch"]["tiling"]["tiles"] == 1
    expected = _masks(plain, (h, w), "prompt_idx")
    ours = {k: m[y:y + h, x:x + w] for k, m in _masks(region, (2000, 2400), "prompt_idx").items()}
    assert expected.keys() == ours.keys() and expected
    for index, mask in expected.items():
        assert iou(ours[index], mask) >= 0.99, index
        assert not _masks(region, (2000, 2400), "prompt_idx")[index][:y].any()  # nothing outside the region


def test_automask_on_a_region_equals_the_cut_out(runner: JobRunner) -> None:
    x, y, w, h = REGION
    automask = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "include_image_edge": True}
    plain = _job(runner, "cut-am", coins(), {"model": "vit_t", "automask": automask})
    region = _job(runner, "big-am", _big_image(), {"model": "vit_t", "automask": automask, "region": list(REGION)})
    expected = sorted((m for m in _masks(plain, (h, w), "object_idx").values()), key=lambda m: (m.sum(), m.argmax()))
    ours = sorted((m[y:y + h, x:x + w] for m in _masks(region, (2000, 2400), "object_idx").values()),
                  key=lambda m: (m.sum(), m.argmax()))
    assert len(expected) == len(ours) > 0
    for a, b in zip(expected, ours):
        assert iou(a, b) >= 0.99
