"""The image encoder a predictor calls: a fast path in front of the eager module.

The wrapper takes the eager encoder's place (``model.image_encoder``) so the upstream
predictors need no change. Any failure of the fast path — when it is built or on any later
call — is logged once and the eager module serves from then on: a job never fails for
want of acceleration. ``path`` names what served the last call, for each result's provenance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from loguru import logger

EAGER = "eager"

FastPath = Callable[[torch.Tensor], Any]


class AcceleratedEncoder(torch.nn.Module):
    def __init__(self, eager: torch.nn.Module, fast: FastPath | None, name: str,
                 input_shape: tuple[int, ...] | None, *, what: str,
                 undo: list[Callable[[], None]] | None = None) -> None:
        super().__init__()
        self.eager = eager
        # Kept out of the module tree: the fast path may be the eager module itself (patched
        # in place) or a compiled view sharing its parameters.
        self.__dict__["_fast"] = fast
        self._name = name
        self._input_shape = input_shape
        self._what = what  # "vit_t (weights 3f2a…)": whose encoder, for the log line
        self._undo = undo or []  # what restores the eager module's own forward methods
        self.path = name if fast is not None else EAGER
        self.failure: str | None = None
        self._register_load_state_dict_pre_hook(self._load_as_eager)

    # The wrapper is invisible in state dicts: a copy of the model (SAM2's video predictor is
    # built from ``model.state_dict()``) sees the eager module's own keys.
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return self.eager.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @staticmethod
    def _load_as_eager(state: dict[str, Any], prefix: str, *_: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "eager.")]:
            state[prefix + "eager." + key[len(prefix):]] = state.pop(key)

    def __getattr__(self, name: str) -> Any:
        # Predictors read encoder attributes such as ``img_size``; they are the eager module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("eager"), name)

    def forward(self, image: torch.Tensor) -> Any:
        if self._fast is not None and (self._input_shape is None or tuple(image.shape) == self._input_shape):
            try:
                out = self._fast(image)
            except Exception as exc:  # a runtime's failure must cost speed, never the job
                self.fail(f"failed on an image: {type(exc).__name__}: {str(exc)[:300]}")
            else:
                self.path = self._name
                return out
        self.path = EAGER
        return self.eager(image)

    def fail(self, reason: str) -> None:
        """Give the fast path up for good, saying why once."""
        logger.warning(f"image encoder {self._name} for {self._what} {reason}; using eager PyTorch instead")
        self._fast = None
        for step in self._undo:
            step()
        self._undo = []
        self.failure = f"{self._name}: {reason}"
        self.path = EAGER


def encoder_path(module: torch.nn.Module) -> str:
    """What served the last image encode of ``module`` (an encoder, wrapped or not)."""
    return module.path if isinstance(module, AcceleratedEncoder) else EAGER
