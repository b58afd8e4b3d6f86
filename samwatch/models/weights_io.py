"""Reading a checkpoint file safely: tensors only, never pickled code."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from samwatch.errors import JobError
from samwatch.vocab import LoadSpec


def load_checkpoint(spec: LoadSpec) -> dict[str, Any]:
    """The state dict in ``spec.checkpoint``; pickle code is refused, not run.

    SAM2 and SAM3 checkpoints wrap their tensors in ``{"model": {...}}``; that wrapper is
    removed here so adapters always get a flat state dict.
    """
    path = spec.checkpoint
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise JobError(
            "weights_unsafe",
            f"The weights {spec.weights_name!r} ({spec.source}) need pickled code to load, which "
            f"samwatch refuses for safety ({str(exc).splitlines()[0][:160]}). Re-save them as a plain "
            "state dict (torch.save(model.state_dict(), ...)) or as safetensors.",
            field="weights",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise JobError(
            "weights_wrong_architecture",
            f"The weights file {path} for {spec.weights_name!r} cannot be read as a checkpoint "
            f"({str(exc).splitlines()[0][:160]}). Check that it is a PyTorch checkpoint for {spec.model_type}.",
            field="weights",
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise JobError(
            "weights_wrong_architecture",
            f"The weights {spec.weights_name!r} hold a {type(state).__name__}, not a state dict of tensors.",
            field="weights",
        )
    return state
