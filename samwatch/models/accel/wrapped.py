"""Model parts a predictor calls: a fast path in front of the eager module.

A wrapper takes the eager part's place (``model.image_encoder``, ``model.mask_decoder``) so
the upstream predictors need no change. Any failure of the fast path — when it is built or
on any later call — is logged once and the eager module serves from then on: a job never
fails for want of acceleration. ``path`` names what served the last call, for each result's
provenance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from loguru import logger

EAGER = "eager"

FastPath = Callable[..., Any]


class Accelerated(torch.nn.Module):
    """What the image encoder and mask decoder wrappers share: transparency and fallback."""

    part = "model part"  # for the log line

    def __init__(self, eager: torch.nn.Module, fast: FastPath | None, name: str,
                 input_shape: tuple[int, ...] | None, *, what: str,
                 undo: list[Callable[[], None]] | None = None) -> None:
        super().__init__()
        self.eager = eager
        # Kept out of the module tree: the fast path may be the eager module itself (patched
        # in place) or a compiled view sharing its parameters.
        self.__dict__["_fast"] = fast
        self._name = name
        self._input_shape = input_shape  # the shape the fast path was built for; others go eager
        self._what = what  # "vit_t (weights 3f2a…)": whose part, for the log line
        self._undo = undo or []  # what restores the eager module's own forward methods
        self.path = name if fast is not None else EAGER
        self.failure: str | None = None
        self._register_load_state_dict_pre_hook(self._load_as_eager)
        self.training = eager.training  # upstream code reads it (SAM2's decoder picks masks by it)

    # The wrapper is invisible in state dicts: a copy of the model (SAM2's video predictor is
    # built from ``model.state_dict()``) sees the eager module's own keys.
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return self.eager.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    @staticmethod
    def _load_as_eager(state: dict[str, Any], prefix: str, *_: Any) -> None:
        for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "eager.")]:
            state[prefix + "eager." + key[len(prefix):]] = state.pop(key)

    def __getattr__(self, name: str) -> Any:
        # Predictors read attributes such as the encoder's ``img_size``; they are the eager module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("eager"), name)

    def _serve(self, fits: bool, fast: Callable[[], Any], eager: Callable[[], Any]) -> Any:
        """``fast()`` when there is a fast path and the input ``fits`` it, else ``eager()``."""
        if self._fast is not None and fits:
            try:
                out = fast()
            except Exception as exc:  # a runtime's failure must cost speed, never the job
                self.fail(f"failed on a call: {type(exc).__name__}: {str(exc)[:300]}")
            else:
                self.path = self._name
                return out
        self.path = EAGER
        return eager()

    def fail(self, reason: str) -> None:
        """Give the fast path up for good, saying why once."""
        logger.warning(f"{self.part} {self._name} for {self._what} {reason}; using eager PyTorch instead")
        self._fast = None
        for step in self._undo:
            step()
        self._undo = []
        self.failure = f"{self._name}: {reason}"
        self.path = EAGER


class AcceleratedEncoder(Accelerated):
    part = "image encoder"

    def forward(self, image: torch.Tensor) -> Any:
        fits = self._input_shape is None or tuple(image.shape) == self._input_shape
        return self._serve(fits, lambda: self._fast(image), lambda: self.eager(image))


class AcceleratedDecoder(Accelerated):
    """A mask decoder whose ``predict_masks`` has a fast path. ``forward`` is the upstream
    class's own, run with this wrapper as ``self``: its call of ``predict_masks`` reaches the
    fast path, and what follows (the multimask slice, SAM2's choice by stability) stays upstream's."""

    part = "mask decoder"

    def __init__(self, eager: torch.nn.Module, fast: FastPath | None, name: str,
                 input_shape: tuple[int, ...] | None, *, what: str, feeds: Callable[..., Any] | None = None,
                 undo: list[Callable[[], None]] | None = None) -> None:
        super().__init__(eager, fast, name, input_shape, what=what, undo=undo)
        self._feeds = feeds  # predict_masks's arguments -> the fast path's inputs, or None if they do not fit

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.eager).forward(self, *args, **kwargs)

    def predict_masks(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self._feeds(*args, **kwargs) if self._fast is not None and self._feeds is not None else None
        return self._serve(inputs is not None, lambda: self._fast(*inputs),
                           lambda: self.eager.predict_masks(*args, **kwargs))


def module_path(module: torch.nn.Module | None) -> str:
    """What served the last call of ``module`` (a part, wrapped or not)."""
    return module.path if isinstance(module, Accelerated) else EAGER
