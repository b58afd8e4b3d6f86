"""Loaded models kept between jobs, keyed by type + weights, within a budget."""

from __future__ import annotations

import gc
import importlib
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger

from samwatch.config import ModelSettings
from samwatch.errors import JobError
from samwatch.models.accel import Accelerator
from samwatch.models.base import ModelAdapter
from samwatch.vocab import LoadSpec
from samwatch.families import FAMILY_OF


#: model type -> the adapter class serving it (raising ``model_not_installed``): the families
#: table a pool loads from; tests hand a pool a fake one
AdapterTable = Callable[[str], type[ModelAdapter]]


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class serving ``model_type``: its family's module, imported on first use."""
    try:
        module = importlib.import_module(f"samwatch.models.{FAMILY_OF[model_type].module}")
    except ImportError as exc:
        raise JobError(
            "model_not_installed",
            f"Model type {model_type} cannot be used: {exc}. Install samwatch with its dependencies.",
            field="model",
        ) from None
    return module.Adapter


class ModelPool:
    def __init__(
        self, device: torch.device, settings: ModelSettings, *, cache_dir: Path | None = None,
        adapters: AdapterTable | None = None,
    ) -> None:
        """``cache_dir`` keeps exported encoders; without one, encoders that need an export stay eager.
        ``adapters``: the families table (None: samwatch's own, ``adapter_class``)."""
        self.device = device
        self._adapters = adapters or adapter_class
        self.settings = settings
        self.accelerator = Accelerator(settings.accelerate.steps_for(device.type), device, cache_dir)
        self._loaded: OrderedDict[tuple[str, str, str], ModelAdapter] = OrderedDict()

    def adapter_for(self, model_type: str) -> type[ModelAdapter]:
        """The class serving ``model_type``; raises ``model_not_installed`` when its package is missing."""
        return self._adapters(model_type)

    @staticmethod
    def key(spec: LoadSpec) -> tuple[str, str, str]:
        return (spec.model_type, spec.weights_name, spec.sha256 or str(spec.checkpoint))

    def get(self, spec: LoadSpec) -> ModelAdapter:
        key = self.key(spec)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        adapter = self.adapter_for(spec.model_type)()
        started = time.perf_counter()
        adapter.setup(spec, self.device, embedding_cache=self.settings.embedding_cache)
        adapter.accelerate(self.accelerator, spec)
        logger.info(
            f"model loaded type={spec.model_type} weights={spec.weights_name} device={self.device} "
            f"encoder={adapter.encoder_path} decoder={adapter.decoder_path} "
            f"params_mb={adapter.parameter_bytes() / 1e6:.0f} seconds={time.perf_counter() - started:.1f}"
        )
        self._loaded[key] = adapter
        self._enforce_budget(keep=key)
        return adapter

    def _enforce_budget(self, keep: tuple[str, str, str]) -> None:
        budget = self.settings.memory_budget_mb
        while len(self._loaded) > 1:
            total_mb = sum(a.parameter_bytes() for a in self._loaded.values()) / 1e6
            over_count = len(self._loaded) > self.settings.max_loaded
            over_memory = budget is not None and total_mb > budget
            if not (over_count or over_memory):
                break
            oldest = next(iter(self._loaded))
            if oldest == keep:
                break
            self._drop(oldest)

    def _drop(self, key: tuple[str, str, str]) -> None:
        self._loaded.pop(key, None)
        logger.info(f"model unloaded type={key[0]} weights={key[1]}")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def evict(self, changed: set[tuple[str, str]]) -> None:
        """Unload models whose registry entry changed or vanished (live reload)."""
        for key in [k for k in self._loaded if (k[0], k[1]) in changed]:
            self._drop(key)

    def holds(self, spec: LoadSpec) -> bool:
        return self.key(spec) in self._loaded

    def loaded(self) -> list[dict[str, str]]:
        return [{"type": k[0], "weights": k[1]} for k in self._loaded]
