"""Shared fixtures: real architectures with random weights, saved as checkpoints.

No weights can be downloaded in CI, so every model test builds the real network with random
(seeded) weights, saves its state dict, and loads it back through samwatch's own loader.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Each xdist worker gets its share of the cores: two workers of two threads each on CI's two
# cores oversubscribe them, and every model test waits on the other's threads.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="timm")

SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
HYPERNETWORK_GAIN = 200.0


@pytest.fixture(autouse=True)
def no_leftover_daemons():
    """A test that fails midway must not leave its ``samwatch run`` subprocesses behind."""
    from support import DaemonProcess

    before = list(DaemonProcess.live)
    yield
    for daemon in [d for d in DaemonProcess.live if d not in before]:
        if daemon.alive():
            daemon.kill()
        DaemonProcess.live.remove(daemon)


#: programs that start a samwatch daemon (``samwatch run``) besides ``-m samwatch``
DAEMON_WRAPPERS = ("fake_samwatch.py", "without_extras.py")


def starts_a_daemon(args: object) -> bool:
    """Whether a Popen argv runs ``samwatch run`` (a CLI command such as ``check`` is not a daemon)."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if "run" not in argv:
        return False
    samwatch = any(argv[i:i + 2] == ["-m", "samwatch"] for i in range(len(argv) - 1))
    return samwatch or any(Path(a).name in DAEMON_WRAPPERS or Path(a).name == "samwatch" for a in argv)


@pytest.fixture(autouse=True)
def daemons_only_in_subprocess_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """``-m "not subprocess"`` is the fast suite: a test that starts a daemon process must say so."""
    if request.node.get_closest_marker("subprocess") is not None:
        return
    real_init = subprocess.Popen.__init__

    def checked(self, args, *rest, **kwargs):  # noqa: ANN001, ANN202
        if starts_a_daemon(args):
            pytest.fail(f"{request.node.nodeid} starts a daemon process ({args}): mark it @pytest.mark.subprocess, "
                        "or drive the daemon in-process (tests/support.py's InProcessDaemon)", pytrace=False)
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow_model tests first. SAM3's alone runs two minutes on one core; started late, as the
    files' order had it, it ran on while the other xdist worker had long finished everything else."""
    items.sort(key=lambda item: item.get_closest_marker("slow_model") is None)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The checkpoint ``name``, built by ``build(path)`` once per session: xdist's workers share
    the session's temp root, so the first builds it under a lock and the others load it."""
    worker_shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    folder = tmp_path_factory.getbasetemp().parent / "weights" if worker_shared else tmp_path_factory.mktemp("weights")
    folder.mkdir(exist_ok=True)
    path = folder / name
    with (folder / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            staging = folder / f".{name}.building"
            build(staging)
            staging.rename(path)
    return path


@pytest.fixture(scope="session")
def vit_t_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(path: Path) -> None:
        from mobile_sam import build_sam_vit_t

        torch.manual_seed(0)
        torch.save(build_sam_vit_t().state_dict(), path)

    return built_once(tmp_path_factory, "vit_t_random.pt", build)


@pytest.fixture(scope="session")
def sam2_t_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAM2.1 hiera_t checkpoint in the official layout ``{"model": state_dict}``."""
    def build(path: Path) -> None:
        from sam2.build_sam import build_sam2

        torch.manual_seed(0)
        torch.save({"model": build_sam2(SAM2_TINY_CONFIG, None, device="cpu").state_dict()}, path)

    return built_once(tmp_path_factory, "sam2.1_hiera_t_random.pt", build)


@pytest.fixture(scope="session")
def conditioned_vit_t(tmp_path_factory: pytest.TempPathFactory, vit_t_checkpoint: Path) -> Path:
    """vit_t with the mask decoder's hypernetwork output layers scaled ×200.

    Random weights give mask logits within ±0.05 of 0, where any rounding flips pixels; scaled,
    |logits| ≫ 0 away from real boundaries, so two computation paths can be compared by IoU.
    """
    def build(path: Path) -> None:
        from samwatch.models.sam1 import build_predictor
        from samwatch.vocab import LoadSpec

        predictor = build_predictor("vit_t", torch.load(vit_t_checkpoint, weights_only=True),
                                    LoadSpec("vit_t", vit_t_checkpoint, "random"))
        with torch.no_grad():
            for mlp in predictor.model.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(HYPERNETWORK_GAIN)
                mlp.layers[-1].bias.mul_(HYPERNETWORK_GAIN)
        torch.save(predictor.model.state_dict(), path)

    return built_once(tmp_path_factory, "vit_t_conditioned.pt", build)


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache for the session, as the daemon's ``state_dir/encoders``."""
    return tmp_path_factory.mktemp("state") / "encoders"


@pytest.fixture(scope="session")
def conditioned_sam2_t(tmp_path_factory: pytest.TempPathFactory, sam2_t_checkpoint: Path) -> Path:
    """sam2_t with its mask decoder's hypernetwork output layers scaled as ``conditioned_vit_t``'s."""
    def build(path: Path) -> None:
        state = torch.load(sam2_t_checkpoint, weights_only=True)["model"]
        for key in state:
            if key.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and ".layers.2." in key:
                state[key] = state[key] * HYPERNETWORK_GAIN
        torch.save({"model": state}, path)

    return built_once(tmp_path_factory, "sam2.1_hiera_t_conditioned.pt", build)
