"""Model parts in ONNX Runtime: each exported once per weights and kept in ``state_dir``.

An export is keyed by everything that makes it valid — which part (image encoder or mask
decoder), model type, weights sha256, input shape, and the torch and onnxruntime versions —
and is written into a temporary folder that is renamed into place, so a crash or a second
daemon never leaves a half-written model where a later start would load it. Outputs may be
any nesting of tensors (SAM2's encoder returns a dict of lists); their structure is stored
beside the model to rebuild it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch.utils import _pytree as pytree

MODEL_FILE = "model.onnx"
LAYOUT_FILE = "outputs.json"
OPSET = 17


def runtime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cache_key(part: str, model_type: str, weights_sha: str, input_shape: tuple[int, ...]) -> str:
    raw = (f"{part}-{model_type}-{weights_sha[:16]}-{'x'.join(map(str, input_shape))}"
           f"-torch{torch.__version__}-ort{runtime_version()}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


class _Flat(torch.nn.Module):
    """A call with its outputs flattened to a tuple (what ONNX can name)."""

    def __init__(self, call: torch.nn.Module) -> None:
        super().__init__()
        self.call = call
        self.layout: str | None = None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, spec = pytree.tree_flatten(self.call(*inputs))
        self.layout = pytree.treespec_dumps(spec)
        return tuple(leaves)


class Export:
    """What to export: a module, example inputs by name, and which of their axes may vary."""

    def __init__(self, module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], *,
                 outputs: Sequence[str] | None = None, dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
        self.module = module
        self.inputs = dict(inputs)
        self.outputs = list(outputs) if outputs else None
        self.dynamic_axes = dynamic_axes

    def write(self, folder: Path) -> None:
        """Write the module as ONNX (fp32, CPU) into ``folder`` (created)."""
        flat = _Flat(self.module).eval()
        folder.mkdir(parents=True)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(flat, tuple(self.inputs.values()), str(folder / MODEL_FILE),
                              input_names=list(self.inputs), output_names=self.outputs,
                              dynamic_axes=self.dynamic_axes, opset_version=OPSET, dynamo=False)
        (folder / LAYOUT_FILE).write_text(json.dumps({"layout": flat.layout}))


def cached_export(export: Export, cache_root: Path, key: str) -> Path:
    """The folder holding ``key``'s export, exporting it first if no complete one exists."""
    final = cache_root / key
    if (final / LAYOUT_FILE).is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".samwatch-export-", dir=cache_root))
    try:
        export.write(staging / "model")
        try:
            os.rename(staging / "model", final)
        except OSError:
            if not (final / LAYOUT_FILE).is_file():  # not a concurrent exporter that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"exported to ONNX: {final}")
    return final


class OrtModule:
    """Calls an export as the eager module is called: tensors in, the same structure out."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its shape-merge notices on SAM2's graph are noise, not faults
        # Idle runtime threads otherwise spin for a while after each call, taking the cores from
        # the PyTorch work in between (prompt encoding, mask upscaling) and from the other
        # part's session: vit_t per box predict 32 -> 25 ms on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The CPU arena keeps the largest call's buffers for the session's life (automask's point
        # batches: gigabytes, held by an idle daemon); without it each call's memory is freed when
        # the call returns, and memory.give_back hands it to the system after the job.
        options.enable_cpu_mem_arena = False
        self.session = onnxruntime.InferenceSession(
            str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.spec = pytree.treespec_loads(json.loads((folder / LAYOUT_FILE).read_text())["layout"])
        self.input_names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        feeds = {name: tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                 for name, tensor in zip(self.input_names, inputs, strict=True)}
        outputs = self.session.run(None, feeds)
        device = inputs[0].device
        return pytree.tree_unflatten([torch.from_numpy(out).to(device) for out in outputs], self.spec)
