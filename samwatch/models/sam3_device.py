"""Running sam3's CUDA-only code on another device, scoped to the SAM3 adapter's calls.

sam3 0.1.x writes ``device="cuda"``, ``.cuda()`` and ``.pin_memory()`` into model code that
is otherwise device-agnostic, so on a CPU (or MPS) host it fails at the first such line.
:class:`CudaRedirect` is a ``TorchFunctionMode`` that rewrites those calls to the chosen
device while it is entered. It is never installed globally: torch keeps the mode stack per
thread, so other adapters (and other threads of the daemon) never see it.

Beyond devices, it keeps float32: sam3's video code casts features to bfloat16 by hand and
relies on the CUDA autocast (which its tracker enters) to make them meet float32 weights
again; off CUDA that autocast is inert, and the casts would end in "Input type (BFloat16)
and bias type (float)" errors.

Left alone, and why:

* ``torch.autocast(device_type="cuda", ...)`` only casts CUDA ops, so with the tensors
  elsewhere it changes nothing (without CUDA torch even disables it, with a warning).
* ``torch.cuda.is_available()`` guards choose CUDA only where CUDA exists; the tensors they
  would place on it are redirected like any other ``device="cuda"`` argument.
* ``torch.cuda.*`` housekeeping calls (``current_device``, ``set_device``, memory stats) are
  not torch functions and cannot be redirected: the adapter avoids the sam3 code that uses
  them (the multi-GPU video predictor's constructor and its logging helpers).

One sam3 bug only shows off CUDA: its CPU connected components fail on an empty batch,
which its video code passes on every frame without new detections;
:func:`empty_safe_connected_components` fixes that for the duration of the video calls.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CUDA_NAME = re.compile(r"cuda(:\d+)?")
# Functions whose positional arguments may name a device as a plain string ("cuda:0").
_TAKES_DEVICE_STRING: frozenset[Callable[..., Any]] = frozenset(
    {torch.Tensor.to, torch._C._nn._parse_to}
)


def _is_cuda(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and _CUDA_NAME.fullmatch(value) is not None


class CudaRedirect(TorchFunctionMode):
    """While entered, tensors sam3 asks to put on CUDA go to ``device`` instead."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.pin_memory:
            return args[0]  # pinned host memory only speeds up copies to a GPU
        if func is torch.Tensor.cuda:
            return args[0].to(self.device, non_blocking=bool(kwargs.get("non_blocking", False)))
        if func is torch.Tensor.to:
            args, kwargs = _keep_float32(args, kwargs)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = self.device
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        strings_too = func in _TAKES_DEVICE_STRING
        args = tuple(
            self.device
            if _is_cuda(arg) and (strings_too or isinstance(arg, torch.device))
            else arg
            for arg in args
        )
        return func(*args, **kwargs)


def _keep_float32(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if kwargs.get("dtype") is torch.bfloat16:
        kwargs["dtype"] = torch.float32
    return tuple(torch.float32 if arg is torch.bfloat16 else arg for arg in args), kwargs


@contextmanager
def empty_safe_connected_components() -> Iterator[None]:
    """sam3's CPU connected components, answering an empty batch with empty labels.

    A module attribute, so not thread-local like the mode; only sam3 calls it, and the
    replacement behaves the same on every batch the original could handle.
    """
    module = importlib.import_module("sam3.perflib.connected_components")
    original = module.connected_components_cpu

    def connected_components_cpu(input_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_tensor.shape[0] == 0:
            labels = torch.zeros(input_tensor.shape, dtype=torch.int64, device=input_tensor.device)
            return labels, labels.clone()
        return original(input_tensor)

    module.connected_components_cpu = connected_components_cpu
    try:
        yield
    finally:
        module.connected_components_cpu = original


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """The context to wrap every sam3 call in, for ``device``.

    On CUDA nothing is redirected; for ``cuda:N`` the current device is set to N for the
    duration, because sam3 means "the current GPU" when it writes "cuda".
    """
    if device.type != "cuda":
        return CudaRedirect(device)
    if device.index is not None:
        return torch.cuda.device(device.index)
    return nullcontext()
