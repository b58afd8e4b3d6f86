"""Accelerated image encoders, chosen per device by ``models.accelerate`` in the config.

The image encoder is most of a job's model time (vit_t on 2 CPU cores: ~1 s of a 1.2 s
20-box job), so it is the one part replaced: the prompt encoder and mask decoder stay eager
fp32. Steps per device (config.py ``AccelerateSettings`` has the defaults and why):
``onnxruntime`` (CPU), ``sdpa``, ``bf16``/``fp16``, ``compile``. Whatever cannot be built
falls back to eager with one warning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from samwatch.models.accel.encoder import EAGER, AcceleratedEncoder, encoder_path

__all__ = ["Accelerator", "AcceleratedEncoder", "EAGER", "encoder_path", "weights_identity"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weights_identity(checkpoint: Path, sha256: str | None) -> str:
    """The weights' sha256; without a known one, a digest of path, size and mtime."""
    if sha256:
        return sha256
    stat = checkpoint.stat()
    return hashlib.sha256(f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


class Accelerator:
    """Builds the fast encoder for one device from its configured steps."""

    def __init__(self, steps: tuple[str, ...], device: torch.device, cache_dir: Path | None) -> None:
        self.steps = steps
        self.device = device
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        return "+".join(self.steps) if self.steps else EAGER

    def wrap(self, encoder: torch.nn.Module, *, model_type: str, weights_sha: str,
             input_shape: tuple[int, ...]) -> AcceleratedEncoder:
        what = f"{model_type} (weights {weights_sha[:12]})"
        if not self.steps or ("onnxruntime" in self.steps and self.cache_dir is None):
            # No steps, or an export with nowhere to keep it (a pool built without a state
            # folder, as in tests): eager by choice, nothing to warn about.
            return AcceleratedEncoder(encoder, None, EAGER, None, what=what)
        undo: list = []
        try:
            fast = self._build(encoder, model_type, weights_sha, input_shape, undo)
        except Exception as exc:  # a path that cannot be built costs speed, never a job
            wrapper = AcceleratedEncoder(encoder, None, self.name, input_shape, what=what)
            for step in undo:
                step()
            wrapper.fail(f"could not be built ({type(exc).__name__}: {str(exc)[:300]})")
            return wrapper
        return AcceleratedEncoder(encoder, fast, self.name, input_shape, what=what, undo=undo)

    def _build(self, encoder: torch.nn.Module, model_type: str, weights_sha: str,
               input_shape: tuple[int, ...], undo: list):
        from samwatch.models.accel import torch_paths

        if "onnxruntime" in self.steps:
            from samwatch.models.accel import onnx_runtime

            key = onnx_runtime.cache_key(model_type, weights_sha, input_shape)
            folder = onnx_runtime.cached_export(encoder, input_shape, self.cache_dir, key)
            return onnx_runtime.OrtEncoder(folder, threads=torch.get_num_threads())
        if "sdpa" in self.steps:
            undo.append(torch_paths.use_sdpa(encoder))
        fast = torch_paths.compiled(encoder, self.device) if "compile" in self.steps else encoder
        dtype = next((_DTYPES[step] for step in self.steps if step in _DTYPES), None)
        return torch_paths.autocast(fast, self.device, dtype) if dtype is not None else fast
