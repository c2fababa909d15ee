"""The int32 accumulator of a quantized layer and its bias (Jacob et al. 2018, sec. 2.4).

An integer device computes ``acc = sum (q_W - Z_W)(q_X - Z_X) + q_b`` at the accumulator scale
``S_acc = S_W * S_X`` (per output channel), holding the bias as ``q_b = round(b / S_acc)``.
:func:`round_biases` puts the simulation's float bias on that grid, so fake-quant and integer
inference add the same bias. Without it a W4A4 ResNet-20 disagrees with its integer engine on
about 3% of test images: at 4 bits ``S_acc`` is coarse (up to ~7% of the next layer's step),
and the bias's rounding flips that share of the next quantizer's rounding decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.nn.binary import BinaryWeight, ScaledBinaryWeight, TernaryWeight
from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer
from lowbit.quant.binary import binarize


@dataclass(frozen=True)
class IntegerCodes:
    """What an integer device stores of a quantizer: codes ``q`` in ``[quant_min, quant_max]``
    standing for ``scale * (q - zero_point)``, per tensor or per channel along ``axis``.
    Affine quantizers (PTQ, STE QAT), LSQ (``scale`` its step, zero point 0) and the weights of
    BinaryConnect, BWN and TWN (codes in {-1, 0, 1}, ``scale`` 1, alpha per filter, alpha)
    all are; TTQ (two scales) and k-means (a codebook) are not."""

    codes: Callable[[torch.Tensor], torch.Tensor]  # the codes (as floats) the quantizer rounds to
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: torch.Tensor
    quant_max: torch.Tensor
    axis: int | None


def integer_codes(slot: nn.Module, weight: torch.Tensor | None = None) -> IntegerCodes | None:
    """The :class:`IntegerCodes` of a calibrated affine or initialised LSQ quantizer (inside a
    bias correction too), or, given the ``weight`` it quantizes, of a binary / ternary weight
    quantizer; None for anything else (k-means, TTQ, sign inputs, an identity slot)."""
    q = slot.quantizer if isinstance(slot, CorrectedQuantizer) else slot
    if isinstance(q, AffineQuantizer) and q.calibrated:
        return IntegerCodes(q.codes, q.scale, q.zero_point, q.quant_min, q.quant_max,
                            q.axis if q.scale.dim() else None)
    if isinstance(q, LSQQuantizer) and bool(q.initialized):
        q_n, q_p = q.bounds
        step = q.step.detach().float()
        axis = q.axis if step.dim() else None

        def lsq_codes(x):  # LSQ divides: round(clamp(x / s, -Q_N, Q_P))
            shape = [1] * x.dim()
            if axis is not None:
                shape[axis] = -1
            s = step.reshape(shape) if step.dim() else step
            return torch.clamp(x / s, -float(q_n), float(q_p)).round()
        return IntegerCodes(lsq_codes, step, torch.zeros_like(step), torch.tensor(-float(q_n)),
                            torch.tensor(float(q_p)), axis)
    if isinstance(q, (BinaryWeight, ScaledBinaryWeight, TernaryWeight)) and weight is not None:
        # the deployed (deterministic) weight is alpha * {-1, 0, 1}: alpha per filter
        deployed = (lambda w: binarize(w)) if isinstance(q, BinaryWeight) else q
        with torch.no_grad():
            alpha = deployed(weight.detach()).abs().reshape(len(weight), -1).amax(1)
            alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return IntegerCodes(lambda w: torch.round(deployed(w.detach()) / alpha.reshape(shape)),
                            alpha, torch.zeros_like(alpha), torch.tensor(-1.0), torch.tensor(1.0),
                            0)
    return None


def weight_scale(layer) -> torch.Tensor | None:
    """``S_W`` per output channel (float64, a bias-correction gain folded in), or None when the
    weight is not calibrated affine integer codes or carries a mean/std shift (a float added to
    every weight of a channel, which no integer kernel stores)."""
    slot = layer.weight_quantizer
    qw = integer_codes(slot, layer.weight)
    if qw is None:
        return None
    rows = layer.weight.shape[0]
    scale = qw.scale.double().expand(rows).clone() if qw.scale.dim() == 0 else qw.scale.double()
    if isinstance(slot, CorrectedQuantizer) and slot.gain.numel():
        if bool((slot.shift != 0).any()):
            return None
        scale = scale * slot.gain.double()
    return scale


def accumulator_scale(layer) -> torch.Tensor | None:
    """``S_W * S_X`` per output channel (float64, a bias-correction gain included), or None when
    the layer has no integer accumulator (an input or weight that is not affine per-tensor /
    per-channel integer codes, or a mean/std weight shift)."""
    qx, scale = integer_codes(layer.input_quantizer), weight_scale(layer)
    if scale is None or qx is None or qx.scale.dim():
        return None
    return scale * float(qx.scale)


@torch.no_grad()
def round_bias(layer) -> bool:
    """Round ``layer``'s bias to its accumulator grid in place: ``b <- S_acc * round(b / S_acc)``.
    Returns False (nothing done) for a layer without bias or integer accumulator."""
    scale = accumulator_scale(layer) if layer.bias is not None else None
    if scale is None:
        return False
    b = layer.bias.double()
    layer.bias.copy_((torch.round(b / scale) * scale).to(layer.bias.dtype))
    return True


def round_biases(model: nn.Module) -> int:
    """:func:`round_bias` on every quantized layer; returns how many biases were rounded."""
    return sum(round_bias(layer) for layer in model.modules() if isinstance(layer, QUANT_LAYERS))
