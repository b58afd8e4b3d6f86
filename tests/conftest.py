"""Shared fixtures: real architectures with random weights, saved as checkpoints.

No weights can be downloaded in CI, so every model test builds the real network with random
(seeded) weights, saves its state dict, and loads it back through samwatch's own loader.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="timm")

SAM2_TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


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


@pytest.fixture(scope="session")
def vit_t_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mobile_sam import build_sam_vit_t

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_t_random.pt"
    torch.save(build_sam_vit_t().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def sam2_t_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAM2.1 hiera_t checkpoint in the official layout ``{"model": state_dict}``."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "sam2.1_hiera_t_random.pt"
    model = build_sam2(SAM2_TINY_CONFIG, None, device="cpu")
    torch.save({"model": model.state_dict()}, path)
    return path
