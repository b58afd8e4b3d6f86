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


#: Prompts per decoder batch on GPUs. Measured on an H100 with vit_t: 64 boxes took 477 ms
#: decoded one by one and 85 ms as one batch (5.6x); the decoder is the same for every SAM1
#: and SAM2 size, so the figure holds for them. Apple GPUs: unmeasured, kept smaller.
GPU_PROMPT_BATCH = {"cuda": 64, "mps": 16}
#: A batch returns float32 logits at full image size, 3 per prompt with multimask output;
#: batches are cut so those stay within this many bytes on the device.
BATCH_LOGITS_BYTES = 2 * 1024**3


def default_prompt_batch_size(device: torch.device, image_pixels: int = 1024 * 1024) -> int:
    """Prompts decoded together for one image of ``image_pixels`` pixels.

    On CPU the decoder repeats the image embedding per prompt, so batching is slower than a
    loop (vit_t, 100 boxes: 6 s looped, 17 s batched): one by one.
    """
    most = GPU_PROMPT_BATCH.get(device.type)
    if most is None:
        return 1
    return max(1, min(most, BATCH_LOGITS_BYTES // (3 * 4 * max(1, image_pixels))))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
