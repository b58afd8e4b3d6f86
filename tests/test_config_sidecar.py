"""The pydantic schemas: config and sidecar, native and samapi forms."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samwatch.config import Config
from samwatch.config_file import load_config
from samwatch.errors import ConfigError, JobError
from samwatch.sidecars.parse import parse_sidecar_text
from samwatch.sidecars.schema import merge_folder_defaults, validate_sidecar

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_is_valid_and_names_every_key() -> None:
    config = load_config(ROOT / "config.example.yaml")
    text = (ROOT / "config.example.yaml").read_text()
    for key, field in Config.model_fields.items():
        assert f"{key}:" in text, key
        sub = getattr(config, key)
        for nested in getattr(type(sub), "model_fields", {}):
            assert f"{nested}:" in text, f"{key}.{nested}"


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inbox: in\nstate_dir: /var/x\n")
    config = load_config(path)
    assert config.inbox == tmp_path / "in" and config.state_dir == Path("/var/x")


@pytest.mark.parametrize("text, fragment", [
    ("bogus: 1\n", "bogus: unknown key"),
    ("watch: {settle_seconds: -1}\n", "watch.settle_seconds"),
    ("device: gpu\n", "device"),
    ("weights: [{name: a, type: vit_b}]\n", "exactly one of url or path"),
    ("weights: [{name: a, type: vit_b, url: ftp://x}]\n", "weights.0.url"),
    ("weights: [{name: a, type: vit_b, url: 'http://x'}, {name: a, type: vit_b, url: 'http://y'}]\n", "two entries named 'a'"),
    ("weights: [{name: a, type: vit_b, path: /no/such.pt}]\n", "no such file"),
    ("inbox: [unclosed\n", "cannot read it as YAML"),
    ("device: cpu\nwatch:\n  mode: polling\n  mode: inotify\n", "mode: given twice in one mapping (again at line 4)"),
])
def test_bad_configs_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_native_and_samapi_forms_give_the_same_job() -> None:
    native = validate_sidecar({"model": "vit_b", "prompts": [{"bbox": [1, 2, 30, 40], "points": [[5, 6]], "point_labels": [1]}], "multimask_output": True}, name="n")
    samapi = validate_sidecar({"type": "vit_b", "bbox": [1, 2, 30, 40], "point_coords": [[5, 6]], "point_labels": [1], "multimask_output": True}, name="s")
    assert native == samapi
    assert samapi.mode == "prompts" and samapi.mask_choice == "all"


def test_samapi_automask_sam3_and_video_bodies() -> None:
    automask = validate_sidecar({"type": "vit_h", "points_per_side": 16, "output_type": "Multi-mask (largest)", "include_image_edge": True}, name="a")
    assert automask.mode == "automask" and automask.automask.points_per_side == 16
    assert automask.automask.include_image_edge and automask.mask_choice == "largest"
    assert validate_sidecar({"type": "vit_h"}, name="e").mode == "automask"
    sam3 = validate_sidecar({"type": "sam3", "text_prompt": "cell", "positive_bboxes": [[10, 20, 5, 6]], "reset_prompts": True}, name="t")
    assert sam3.mode == "text" and sam3.boxes_xyxy(True) == [(10, 20, 15, 26)]
    native3 = validate_sidecar({"model": "sam3", "text": "cell", "positive_bboxes": [[10, 20, 15, 26]]}, name="t")
    assert native3.boxes_xyxy(True) == [(10, 20, 15, 26)]
    video = validate_sidecar({"type": "sam2_t", "axes": "XYZ", "start_frame_idx": 2, "objs": {"0": [{"obj_id": 1, "point_coords": [[1, 2]], "point_labels": [1]}]}}, name="v")
    assert video.mode == "video" and video.video.axes == "XYZ" and video.video.objects[0][0].points == [(1, 2)]


@pytest.mark.parametrize("body, code, field", [
    ({"model": "vit_z"}, "unknown_model", "model"),
    ({"prompts": [{"points": [[1, 2]], "point_labels": [1, 0]}]}, "sidecar_invalid", "prompts.0"),
    ({"prompts": [{}]}, "sidecar_invalid", "prompts.0"),
    ({"b64img": "AAAA"}, "sidecar_invalid", None),
    ({"output": {"object_type": "cell"}}, "sidecar_invalid", "output.object_type"),
])
def test_bad_sidecars(body: dict, code: str, field: str | None) -> None:
    with pytest.raises(JobError) as err:
        validate_sidecar(body, name="x.yaml")
    assert err.value.code == code
    if field:
        assert err.value.field == field
    assert err.value.file == "x.yaml"


def test_parse_errors_say_where() -> None:
    with pytest.raises(JobError) as err:
        parse_sidecar_text("prompts: [\n  bbox: [1,\n", name="x.yaml")
    assert err.value.code == "sidecar_parse_error" and "line" in err.value.message
    with pytest.raises(JobError):
        parse_sidecar_text("- a list", name="x.yaml")


BIG_PROMPTS = "".join(f"  - {{bbox: [1, 2, 30, {10 + i % 50}]}}\n" for i in range(3000))  # parsed in the child (yaml_child.py)


@pytest.mark.parametrize("text, key, line", [
    ("prompts: [{bbox: [1, 2, 3, 4]}]\nlabel: x\nprompts: [{points: [[1, 1]]}]\n", "prompts", 3),
    ("prompts:\n  - bbox: [1, 2, 3, 4]\n    label: a\n    label: b\n", "label", 4),
    ('{"prompts": [], "label": "a", "label": "b"}', "label", 1),  # JSON too: YAML then says where
    ("prompts:\n" + BIG_PROMPTS + "prompts: []\n", "prompts", 3002),
], ids=["top", "nested", "json", "big"])
def test_a_key_twice_is_refused_naming_it_and_its_line(text: str, key: str, line: int) -> None:
    with pytest.raises(JobError) as err:
        parse_sidecar_text(text, name="x.yaml")
    assert err.value.code == "sidecar_invalid" and err.value.field == key and err.value.to_dict()["line"] == line
    assert f"{key!r} appears twice" in err.value.message and f"line {line}" in err.value.message


def test_merged_keys_may_be_overridden_and_big_sidecars_still_parse() -> None:
    data = parse_sidecar_text("base: &b {label: a, color: [1, 2, 3]}\nlabel: x\nprompts:\n  - {<<: *b, label: c}\n", name="x.yaml")
    assert data["prompts"][0] == {"label": "c", "color": [1, 2, 3]}
    assert len(parse_sidecar_text("prompts:\n" + BIG_PROMPTS, name="x.yaml")["prompts"]) == 3000


def test_folder_defaults_inherit_settings_not_prompts() -> None:
    merged = merge_folder_defaults({"prompts": [{"bbox": [1, 2, 3, 4]}]}, {"model": "sam2_t", "label": "cell", "automask": {}, "prompts": [{"bbox": [0, 0, 1, 1]}]})
    assert merged == {"model": "sam2_t", "label": "cell", "prompts": [{"bbox": [1, 2, 3, 4]}]}
    assert "model" not in merge_folder_defaults({"type": "vit_b"}, {"model": "sam2_t"})


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (ROOT / "systemd" / "samwatch.service").read_text()
    # verify checks that ExecStart's binary exists: point it at this interpreter.
    unit = unit.replace("/opt/samwatch/.venv/bin/samwatch", sys.executable)
    target = tmp_path / "samwatch.service"
    target.write_text(unit)
    result = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "samwatch.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
    for needle in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM",
                   "TimeoutStopSec=", "ProtectSystem=strict", "ReadWritePaths=", "NoNewPrivileges=true", "PrivateTmp=true", "User=samwatch"):
        assert needle in unit
