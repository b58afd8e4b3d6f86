"""Accelerated model parts, chosen per device by ``models.accelerate`` in the config.

The image encoder is most of a job's model time (vit_t on 2 CPU cores: ~1 s of a 1.2 s
20-box job); once it is fast, SAM's per-prompt mask decoder is the CPU's next cost (vit_t:
~33 ms of a box's 36 ms). Steps per device (config.py ``AccelerateSettings`` has the
defaults and why): ``onnxruntime`` (CPU: the encoder and the mask decoder),
``sdpa``, ``bf16``/``fp16``, ``compile`` (the encoder only). Whatever cannot be built falls
back to eager with one warning.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from samwatch.models.accel.decoders import DecoderExport
from samwatch.models.accel.wrapped import EAGER, Accelerated, AcceleratedDecoder, AcceleratedEncoder, module_path

__all__ = ["Accelerator", "AcceleratedDecoder", "AcceleratedEncoder", "DecoderExport", "EAGER", "module_path",
           "weights_identity"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ORT = "onnxruntime"


def weights_identity(checkpoint: Path, sha256: str | None) -> str:
    """The weights' sha256; without a known one, a digest of path, size and mtime."""
    if sha256:
        return sha256
    stat = checkpoint.stat()
    return hashlib.sha256(f"{checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


class Accelerator:
    """Builds the fast model parts for one device from its configured steps."""

    def __init__(self, steps: tuple[str, ...], device: torch.device, cache_dir: Path | None) -> None:
        self.steps = steps
        self.device = device
        self.cache_dir = cache_dir

    @property
    def name(self) -> str:
        return "+".join(self.steps) if self.steps else EAGER

    def wrap(self, encoder: torch.nn.Module, *, model_type: str, weights_sha: str,
             input_shape: tuple[int, ...]) -> AcceleratedEncoder:
        """The image encoder behind this device's steps."""
        def build(undo: list) -> object:
            return self._build_encoder(encoder, model_type, weights_sha, input_shape, undo)

        return self._wrapped(AcceleratedEncoder, encoder, self.name, build, model_type, weights_sha, input_shape,
                             wanted=bool(self.steps))

    def wrap_decoder(self, decoder: torch.nn.Module, family: Callable[..., DecoderExport], *, model_type: str,
                     weights_sha: str, embedding_shape: tuple[int, ...]) -> AcceleratedDecoder:
        """A mask decoder with ``predict_masks`` in ONNX Runtime when the steps say ``onnxruntime``,
        else eager. ``family`` (``decoders.sam1``, ``decoders.sam2``) says how to export and feed it;
        ``embedding_shape`` is one image's embedding (1 × channels × h × w)."""
        plan = family(decoder, embedding_shape)

        def build(undo: list) -> object:
            from samwatch.models.accel import onnx_runtime

            export = onnx_runtime.Export(plan.module, plan.inputs, outputs=plan.outputs,
                                         dynamic_axes=plan.dynamic_axes())
            return self._in_onnx_runtime(export, "decoder", model_type, weights_sha, embedding_shape)

        wrapper = functools.partial(AcceleratedDecoder, feeds=plan.feeds)
        return self._wrapped(wrapper, decoder, ORT, build, model_type, weights_sha, embedding_shape,
                             wanted=ORT in self.steps)

    def _wrapped(self, wrapper: Callable[..., Accelerated], module: torch.nn.Module, name: str,
                 build: Callable[[list], object], model_type: str, weights_sha: str,
                 input_shape: tuple[int, ...], *, wanted: bool) -> Accelerated:
        what = f"{model_type} (weights {weights_sha[:12]})"
        if not wanted or (ORT in self.steps and self.cache_dir is None):
            # No steps, or an export with nowhere to keep it (a pool built without a state
            # folder, as in tests): eager by choice, nothing to warn about.
            return wrapper(module, None, EAGER, None, what=what)
        undo: list = []
        try:
            fast = build(undo)
        except Exception as exc:  # a path that cannot be built costs speed, never a job
            failed = wrapper(module, None, name, input_shape, what=what)
            for step in undo:
                step()
            failed.fail(f"could not be built ({type(exc).__name__}: {str(exc)[:300]})")
            return failed
        return wrapper(module, fast, name, input_shape, what=what, undo=undo)

    def _build_encoder(self, encoder: torch.nn.Module, model_type: str, weights_sha: str,
                       input_shape: tuple[int, ...], undo: list):
        from samwatch.models.accel import torch_paths

        if ORT in self.steps:
            from samwatch.models.accel import onnx_runtime

            export = onnx_runtime.Export(encoder, {"image": torch.randn(*input_shape)})
            return self._in_onnx_runtime(export, "encoder", model_type, weights_sha, input_shape)
        if "sdpa" in self.steps:
            undo.append(torch_paths.use_sdpa(encoder))
        fast = torch_paths.compiled(encoder, self.device) if "compile" in self.steps else encoder
        dtype = next((_DTYPES[step] for step in self.steps if step in _DTYPES), None)
        return torch_paths.autocast(fast, self.device, dtype) if dtype is not None else fast

    def _in_onnx_runtime(self, export, part: str, model_type: str, weights_sha: str, input_shape: tuple[int, ...]):
        """A session on ``export`` from the cache (exported first if none is there)."""
        from samwatch.models.accel import onnx_runtime

        key = onnx_runtime.cache_key(part, model_type, weights_sha, input_shape)
        return onnx_runtime.OrtModule(onnx_runtime.cached_export(export, self.cache_dir, key),
                                      threads=torch.get_num_threads())
