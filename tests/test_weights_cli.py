"""Editing the config's weights list, and ``samwatch weights ...`` run as functions."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from samwatch.config import WeightsEntry
from samwatch.config_file import load_config
from samwatch.cli.config_edit import add_weights_entry, remove_weights_entry
from samwatch.errors import ConfigError
from samwatch.weights.locks import cancel_file_path
from samwatch.cli.main import build_parser

LAB_CONFIG = """\
# samwatch config for the lab
inbox: inbox   # where images arrive
outbox: outbox

weights:
  # the lab's fine-tuned model
  - {name: lab, type: vit_b, url: "https://example.org/vit_b_lab.pth"}
  - name: old
    type: vit_l
    url: https://example.org/old.pth   # superseded

defaults: {model: vit_t, weights: default}  # used when a sidecar says nothing
"""

NEW = WeightsEntry(name="new", type="vit_t", url="https://example.org/new.pt", sha256="a" * 64)


def names(path: Path) -> list[str]:
    return [entry.name for entry in load_config(path, check_files=False).weights]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "samwatch.yaml"
    path.write_text(LAB_CONFIG)
    return path


# -- config_edit ------------------------------------------------------------------------


def test_add_appends_one_line_and_keeps_everything_else(config: Path) -> None:
    add_weights_entry(config, NEW)
    lines = config.read_text().splitlines()
    assert [line for line in lines if "new" not in line] == LAB_CONFIG.splitlines()
    (added,) = [i for i, line in enumerate(lines) if line.startswith("  - {name: new, type: vit_t, url: ")]
    assert lines[added - 1] == "    url: https://example.org/old.pth   # superseded"
    assert names(config) == ["lab", "old", "new"]


def test_add_creates_the_block_or_the_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("inbox: in\n# the end")
    add_weights_entry(plain, NEW)
    assert plain.read_text().startswith("inbox: in\n# the end\n")
    assert names(plain) == ["new"]

    empty_list = tmp_path / "empty.yaml"
    empty_list.write_text("weights: []  # none yet\ndevice: cpu\n")
    add_weights_entry(empty_list, NEW)
    assert empty_list.read_text().splitlines()[0].split() == ["weights:", "#", "none", "yet"]
    assert names(empty_list) == ["new"] and load_config(empty_list).device == "cpu"

    created = tmp_path / "sub" / "new.yaml"
    add_weights_entry(created, NEW)
    assert names(created) == ["new"]


def test_add_path_entry_relative_to_the_config(tmp_path: Path, config: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lab.pt").write_bytes(b"x")
    add_weights_entry(config, WeightsEntry(name="local", type="vit_b", path=Path("models/lab.pt")))
    (entry,) = [e for e in load_config(config).weights if e.name == "local"]
    assert entry.path == tmp_path / "models" / "lab.pt"


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(WeightsEntry(name="lab", type="vit_b", url="https://example.org/x.pth"), id="duplicate"),
        pytest.param(WeightsEntry(name="ghost", type="vit_b", path=Path("/nonexistent/ghost.pt")), id="missing-file"),
    ],
)
def test_an_invalid_edit_is_refused_and_the_file_untouched(config: Path, entry: WeightsEntry) -> None:
    before = config.read_bytes()
    with pytest.raises(ConfigError) as refused:
        add_weights_entry(config, entry)
    assert refused.value.file == str(config)
    assert config.read_bytes() == before
    assert sorted(p.name for p in config.parent.iterdir()) == ["samwatch.yaml"]


def test_an_invalid_config_is_not_edited(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("inbox: in\nwatch: {moed: polling}\n")
    with pytest.raises(ConfigError) as refused:
        add_weights_entry(path, NEW)
    assert any("watch.moed" in problem for problem in refused.value.problems)
    assert path.read_text() == "inbox: in\nwatch: {moed: polling}\n"


def test_the_edit_is_atomic(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[Path, Path]] = []

    def failing_replace(source: Any, destination: Any) -> None:
        renames.append((Path(source), Path(destination)))
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        add_weights_entry(config, NEW)
    monkeypatch.undo()
    (source, destination), = renames
    assert source.parent == destination.parent == config.parent  # written aside in the same folder
    assert config.read_text() == LAB_CONFIG
    assert sorted(p.name for p in config.parent.iterdir()) == ["samwatch.yaml"]


def test_remove_drops_only_the_entry(config: Path) -> None:
    assert remove_weights_entry(config, "vit_l", "old")
    text = config.read_text()
    assert "old" not in text and "# the lab's fine-tuned model" in text and "# used when a sidecar" in text
    assert names(config) == ["lab"]

    assert remove_weights_entry(config, "vit_b", "lab")
    assert "# the lab's fine-tuned model" in config.read_text()
    assert names(config) == [] and load_config(config).defaults.model == "vit_t"

    assert not remove_weights_entry(config, "vit_b", "lab")
    assert not remove_weights_entry(config.parent / "absent.yaml", "vit_b", "lab")


def test_a_flow_list_stays_one_and_keeps_its_comments(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text("# comment\nweights: [{name: a, type: vit_b, url: 'https://example.org/a.pt'}]  # lab\n")
    add_weights_entry(path, NEW)
    assert names(path) == ["a", "new"]
    text = path.read_text()
    assert text.startswith("# comment\nweights: [{name: a, type: vit_b, url: 'https://example.org/a.pt'}, {name: new")
    assert text.rstrip().endswith("# lab")


# -- the CLI ----------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(tmp_path)
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)  # loopback only, never through a proxy
    parser = build_parser()

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return args.func(args)

    return run


@pytest.fixture
def served(tmp_path: Path) -> Any:
    """A loopback server for the files in tmp_path/served; yields its base URL."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


def listed(cli: Any, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[tuple[str, str], dict[str, Any]]:
    capsys.readouterr()
    assert cli("weights", "list", "--json", *extra) == 0
    return {(item["type"], item["name"]): item for item in json.loads(capsys.readouterr().out)}


def test_add_list_remove_with_the_default_config(cli: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("weights", "add", "lab", "vit_b", "https://example.org/lab.pth", "--sha256", "B" * 64) == 0
    assert (tmp_path / "samwatch.config.yaml").exists()
    items = listed(cli, capsys)
    assert items[("vit_b", "lab")]["sha256"] == "b" * 64
    assert items[("vit_b", "lab")]["state"] == "not fetched"
    assert ("sam3", "default") in items
    assert set(listed(cli, capsys, "--type", "vit_b")) == {("vit_b", "default"), ("vit_b", "lab")}

    (tmp_path / "mine.pt").write_bytes(b"weights")
    sam2_config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert cli("weights", "add", "mine", "sam2_t", "mine.pt", "--sam2-config", sam2_config) == 0
    mine = listed(cli, capsys)[("sam2_t", "mine")]
    assert mine["path"] == str(tmp_path / "mine.pt") and mine["state"] == "ready"

    assert cli("weights", "remove", "lab") == 0
    assert ("vit_b", "lab") not in listed(cli, capsys)


def test_usage_errors_exit_2(cli: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("weights", "add", "x", "vit_b", "missing.pt") == 2
    assert cli("weights", "add", "x", "vit_b", "https://example.org/x.pth", "--sam2-config", "c.yaml") == 2
    assert cli("weights", "add", "bad name", "vit_b", "https://example.org/x.pth") == 2
    assert cli("weights", "fetch") == 2
    assert cli("weights", "fetch", "default") == 2  # every type has one: --type needed
    assert cli("weights", "remove", "default", "--type", "vit_b") == 2
    assert "ambiguous" not in capsys.readouterr().err  # the messages say what to do instead
    (tmp_path / "broken.yaml").write_text("inbox: [\n")
    assert cli("weights", "list", "--config", "broken.yaml") == 2
    assert "broken.yaml" in capsys.readouterr().err


def test_fetch_downloads_with_progress_and_reports_failures(
    cli: Any, served: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, folder = served
    payload = os.urandom(3 * 1024 * 1024)
    (folder / "lab.pth").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    config = tmp_path / "conf" / "samwatch.yaml"
    assert cli("weights", "add", "lab", "vit_b", f"{base}/lab.pth", "--sha256", digest, "--config", str(config)) == 0
    assert cli("weights", "add", "gone", "vit_b", f"{base}/gone.pth", "--config", str(config)) == 0
    capsys.readouterr()

    assert cli("weights", "fetch", "lab", "--config", str(config)) == 0
    out, err = capsys.readouterr()
    assert digest in out and "100%" in err
    saved = config.parent / ".samwatch" / "weights" / "vit_b"
    assert [p.read_bytes() == payload for p in saved.glob("lab-*.pth")] == [True]

    assert cli("weights", "fetch", "gone", "--type", "vit_b", "--config", str(config)) == 1
    assert "weights_download_failed" in capsys.readouterr().err

    assert cli("weights", "list", "--config", str(config)) == 0
    table = capsys.readouterr().out
    assert any(line.startswith("vit_b") and " lab " in line and "ready" in line for line in table.splitlines())


def test_cancel_writes_the_request_for_the_daemon(cli: Any, tmp_path: Path) -> None:
    assert cli("weights", "cancel", "default", "--type", "sam3") == 0
    request = json.loads(cancel_file_path(tmp_path / ".samwatch").read_text())
    assert request["type"] == "sam3" and request["name"] == "default"
