"""Arrays of any dtype and channel count -> the RGB uint8 the models take (:func:`to_rgb8`).

Shared by ``media`` (whole frames) and ``slides`` (regions of a slide), so both follow one rule:

1. Channel axis: given by the reader (channels last); for a bare array, the last axis if
   ``shape[-1] <= 4``, else the first if ``shape[0] <= 8``.
2. Channel choice: ``ChannelRule.channels`` lists the channels (0-based) for R, G, B; one
   channel is grey replicated to R, G and B, two give R and G with B = 0, three give RGB.
   With ``channels=None``: the first three channels (so RGBA drops alpha, a 5-channel
   image shows channels 0, 1, 2); one channel is grey; two channels are R and G.
3. Intensities, per chosen channel:
   bool / 1-bit -> 0 and 255 whatever ``normalize`` says;
   ``"auto"``: uint8 untouched, any other dtype as ``"percentile"``;
   ``"percentile"``: the ``low`` .. ``high`` percentiles map linearly onto 0 .. 255, clipped;
   ``"minmax"``: min .. max onto 0 .. 255;
   ``"none"``: uint8 untouched, other integers scaled from their dtype's full range
   (uint16 0 .. 65535 -> 0 .. 255), floats taken as 0 .. 1.
   A constant channel (high == low) becomes 0, NaN becomes 0; bounds ignore NaN and inf.
   ``bounds`` passed to :func:`to_rgb8` replace an array's own: a stack (``media``) and a
   slide (``slides``) compute them once, so all frames or regions share one stretch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samwatch.errors import JobError

_NORMALIZE_MODES = ("auto", "percentile", "minmax", "none")
# Percentiles over 100-megapixel frames are slow; a strided sample of this many values per
# channel and frame gives the same bounds to well under one grey level.
_STRETCH_SAMPLES = 1 << 20

Bounds = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ChannelRule:
    """How >3-channel or non-uint8 data become RGB uint8 (see the module docstring)."""

    channels: tuple[int, ...] | None = None
    normalize: str = "auto"
    low: float = 0.5
    high: float = 99.5

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, not {self.normalize!r}")
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"need 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.channels is not None and (
            not 1 <= len(self.channels) <= 3 or any(c < 0 for c in self.channels)
        ):
            raise ValueError(f"channels must list 1 to 3 indices >= 0, got {self.channels}")


def to_rgb8(
    array: np.ndarray,
    rule: ChannelRule = ChannelRule(),
    *,
    channel_axis: int | None = None,
    bounds: Bounds | None = None,
) -> np.ndarray:
    """Convert a 2-D or 3-D array to RGB uint8 H x W x 3 by the module docstring's rule.

    ``channel_axis`` overrides the guess for 3-D input; ``bounds`` (low, high per chosen
    channel) replaces the array's own stretch bounds, so a stack shares one stretch.
    """
    chosen = select_channels(_to_hwc(np.asarray(array), channel_axis), rule.channels)
    return _assemble_rgb(_to_uint8(chosen, rule, bounds))


def check_channels(channels: tuple[int, ...] | None, n_channels: int, path: Path | None) -> None:
    missing = [c for c in channels or () if c >= n_channels]
    if missing:
        name = f"'{path.name}'" if path else "the image"
        raise JobError(
            "sidecar_invalid",
            f"Channel {missing[0]} was asked for but {name} has {n_channels} channel(s), "
            f"numbered from 0; pick channels between 0 and {n_channels - 1}.",
            field="channels", file=str(path) if path else None)


def _to_hwc(array: np.ndarray, channel_axis: int | None) -> np.ndarray:
    if array.ndim == 2:
        return array[..., np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {array.shape}")
    if channel_axis is None:
        channel_axis = _guess_channel_axis(array.shape)
    return np.moveaxis(array, channel_axis, -1)


def _guess_channel_axis(shape: tuple[int, ...]) -> int:
    if shape[-1] <= 4:
        return -1
    if shape[0] <= 8:
        return 0
    raise ValueError(f"cannot tell which axis of shape {shape} holds the channels; "
                     "pass channel_axis")


def select_channels(hwc: np.ndarray, channels: tuple[int, ...] | None) -> np.ndarray:
    n_channels = hwc.shape[-1]
    check_channels(channels, n_channels, None)
    picks = list(channels) if channels is not None else list(range(min(n_channels, 3)))
    return hwc if picks == list(range(n_channels)) else hwc[..., picks]


def needs_stretch(dtype: np.dtype, rule: ChannelRule) -> bool:
    if dtype == np.bool_ or rule.normalize == "none":
        return False
    return rule.normalize != "auto" or dtype != np.uint8


def _to_uint8(chosen: np.ndarray, rule: ChannelRule,
              bounds: Bounds | None) -> np.ndarray:
    if chosen.dtype == np.bool_:
        return chosen.astype(np.uint8) * np.uint8(255)
    if needs_stretch(chosen.dtype, rule):
        low, high = bounds if bounds is not None else stretch_bounds([chosen], rule)
        return _stretch(chosen, low, high)
    if chosen.dtype == np.uint8:
        return chosen
    return _dtype_range(chosen)


def stretch_bounds(samples: list[np.ndarray], rule: ChannelRule) -> Bounds:
    """Per-channel (low, high) over H x W x k samples; a channel with no finite value gets 0, 0."""
    n_channels = samples[0].shape[-1]
    low, high = np.zeros(n_channels, np.float32), np.zeros(n_channels, np.float32)
    for c in range(n_channels):
        values = np.concatenate([_subsample(s[..., c]) for s in samples]).astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        picked = (values.min(), values.max()) if rule.normalize == "minmax" \
            else np.percentile(values, [rule.low, rule.high])
        with np.errstate(over="ignore"):  # beyond float32 becomes inf: a flat, black channel
            low[c], high[c] = picked
    return low, high


def _subsample(plane: np.ndarray) -> np.ndarray:
    flat = plane.ravel()
    return flat[:: max(1, flat.size // _STRETCH_SAMPLES)]


def _stretch(chosen: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    span = high - low
    scale = np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (chosen.astype(np.float32) - low) * scale
    return _clip_to_uint8(scaled)


def _dtype_range(chosen: np.ndarray) -> np.ndarray:
    if chosen.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # huge float64 -> inf -> 255
            return _clip_to_uint8(chosen.astype(np.float32) * 255)
    info = np.iinfo(chosen.dtype)
    return _clip_to_uint8((chosen.astype(np.float64) - info.min) * (255 / (info.max - info.min)))


def _clip_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(values, 0, 255, out=values), out=values).astype(np.uint8)


def _assemble_rgb(channels8: np.ndarray) -> np.ndarray:
    n_channels = channels8.shape[-1]
    if n_channels == 1:
        return np.repeat(channels8, 3, axis=-1)
    if n_channels == 2:
        return np.concatenate([channels8, np.zeros_like(channels8[..., :1])], axis=-1)
    return np.ascontiguousarray(channels8)

