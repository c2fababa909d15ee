"""Bias correction of quantized weights (Banner, Nahshan, Soudry 2019, eq. 12-13).

Quantization shifts each output channel's mean and shrinks or stretches its spread. Per output
channel c, with W_q the quantized weights:

    mean:      W_q' = W_q - mean_c(W_q) + mean_c(W)                         (reference ``-bcw``)
    mean_std:  W_q' = (W_q - mean_c(W_q)) std_c(W) / (std_c(W_q) + 1e-8) + mean_c(W)
               (reference ``-vcw`` then ``-bcw``: restores both mean and std exactly)

The correction is returned as a per-channel affine map ``W_q' = gain * W_q + shift`` so a
quantizer can apply it after fake quantization without storing off-grid weights.
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.quant.ranges import channel_rows

MODES = ("mean", "mean_std")


def correct_weight_bias(w: torch.Tensor, w_q: torch.Tensor, mode: str = "mean", axis: int = 0):
    """Per-channel (gain, shift) with ``gain * W_q + shift`` matching W's mean (and std)."""
    if mode not in MODES:
        raise ConfigError(f"weight bias correction must be one of {MODES}, got {mode!r}")
    rows, rows_q = channel_rows(w, axis), channel_rows(w_q, axis)
    mean, mean_q = rows.mean(1), rows_q.mean(1)
    if mode == "mean":
        gain = torch.ones_like(mean)
    else:
        gain = rows.std(1) / (rows_q.std(1) + 1e-8)
    return gain, mean - gain * mean_q
