"""The image encoder in ONNX Runtime: exported once per weights and kept in ``state_dir``.

An export is keyed by everything that makes it valid — model type, weights sha256, input
shape, and the torch and onnxruntime versions — and is written into a temporary folder that
is renamed into place, so a crash or a second daemon never leaves a half-written model where
a later start would load it. Outputs may be any nesting of tensors (SAM2's encoder returns a
dict of lists); their structure is stored beside the model to rebuild it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch.utils import _pytree as pytree

MODEL_FILE = "encoder.onnx"
LAYOUT_FILE = "outputs.json"
OPSET = 17


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cache_key(model_type: str, weights_sha: str, input_shape: tuple[int, ...]) -> str:
    raw = f"{model_type}-{weights_sha[:16]}-{'x'.join(map(str, input_shape))}-torch{torch.__version__}-ort{runtime_version()}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


class _Flat(torch.nn.Module):
    """The encoder with its outputs flattened to a tuple (what ONNX can name)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.layout: str | None = None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, spec = pytree.tree_flatten(self.encoder(image))
        self.layout = pytree.treespec_dumps(spec)
        return tuple(leaves)


def export(encoder: torch.nn.Module, input_shape: tuple[int, ...], folder: Path) -> None:
    """Write ``encoder`` as ONNX (fp32, CPU) into ``folder`` (created)."""
    flat = _Flat(encoder).eval()
    example = torch.randn(*input_shape)
    folder.mkdir(parents=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(flat, (example,), str(folder / MODEL_FILE), input_names=["image"],
                          opset_version=OPSET, dynamo=False)
    (folder / LAYOUT_FILE).write_text(json.dumps({"layout": flat.layout}))


def cached_export(encoder: torch.nn.Module, input_shape: tuple[int, ...], cache_root: Path, key: str) -> Path:
    """The folder holding ``key``'s export, exporting it first if no complete one exists."""
    final = cache_root / key
    if (final / LAYOUT_FILE).is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".samwatch-export-", dir=cache_root))
    try:
        export(encoder, input_shape, staging / "model")
        try:
            os.rename(staging / "model", final)
        except OSError:
            if not (final / LAYOUT_FILE).is_file():  # not a concurrent exporter that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"image encoder exported to ONNX: {final}")
    return final


class OrtEncoder:
    """Calls the exported encoder as the eager one is called: a tensor in, the same structure out."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its shape-merge notices on SAM2's graph are noise, not faults
        self.session = onnxruntime.InferenceSession(
            str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.spec = pytree.treespec_loads(json.loads((folder / LAYOUT_FILE).read_text())["layout"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, image: torch.Tensor) -> Any:
        array = image.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = self.session.run(None, {self.input_name: array})
        return pytree.tree_unflatten([torch.from_numpy(out).to(image.device) for out in outputs], self.spec)

