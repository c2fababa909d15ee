"""Per-layer quantization error of the weights: MSE and SQNR.

SQNR (dB) = 10 log10( sum w^2 / sum (w - Q(w))^2 ), the signal-to-quantization-noise ratio;
each extra bit adds about 6 dB.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.quantizer import AffineQuantizer, affine_part


@torch.no_grad()
def layer_stats(model: nn.Module) -> list[dict]:
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        w = layer.weight.detach()
        w_q = layer.quantized_weight().detach()
        noise = (w - w_q).pow(2).sum().item()
        signal = w.pow(2).sum().item()
        q = affine_part(layer.weight_quantizer)
        a = layer.input_quantizer
        rows.append({
            "layer": name,
            "w_bits": float(q.bits.float().mean()) if q is not None else 32.0,
            "a_bits": float(a.bits.float().mean()) if isinstance(a, AffineQuantizer) else None,
            "weight_mse": noise / w.numel(),
            "weight_sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf,
        })
    return rows
