"""Choosing the device: ``auto`` is cuda, then mps, then cpu."""

from __future__ import annotations

import torch


class DeviceUnavailable(Exception):
    pass


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {setting!r} is configured but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {setting!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable("device 'mps' is configured but MPS is not available on this machine")
    return device


def pick_devices(setting: str | list[str]) -> list[torch.device]:
    """One entry per executor slot: ``auto`` is every visible GPU (else mps, else cpu); a list is
    taken as given (``[cpu, cpu]`` is two CPU slots)."""
    if isinstance(setting, list):
        return [pick_device(item) for item in setting]
    if setting == "auto" and torch.cuda.is_available():
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return [pick_device(setting)]


#: Prompts per decoder batch on GPUs. Measured on an H100 with vit_t: 64 boxes took 477 ms
#: decoded one by one and 85 ms as one batch (5.6x); the decoder is the same for every SAM1
#: and SAM2 size, so the figure holds for them. Apple GPUs: unmeasured, kept smaller. Large
#: images get smaller batches (models/budget.py ``prompt_batch``).
GPU_PROMPT_BATCH = {"cuda": 64, "mps": 16}


def default_prompt_batch_size(device: torch.device) -> int:
    """On CPU one by one: the decoder repeats the image embedding per prompt, so batching is
    slower than a loop there (vit_t, 100 boxes: 6 s looped, 17 s batched)."""
    return GPU_PROMPT_BATCH.get(device.type, 1)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
