"""Position-based scaled gradient (Kim, Yoo, Kwak, "Position-based Scaled Gradient for Model
Quantization and Pruning", NeurIPS 2020; ALGORITHMS.md section 1).

The forward pass is the identity: the network trains and is stored in full precision. The
backward pass scales each weight's gradient by its distance to the nearest target point::

    dL/dw <- lambda_s * |w - Q(w)| * dL/dw

so weights near a grid point barely move and the weight distribution collapses onto the grid;
plain post-training quantization of the result is then nearly lossless. The target grid is
symmetric in the restricted range, per tensor (the reference) or per output channel::

    K = 2^(b-1) - 1,   A = max(|min(0, w_min)|, max(0, w_max)),   Delta = A / K
    Q(w) = Delta * round(clip(w / Delta, -K, K))

For sparse training the target point is 0 and the scaling is lambda_s * |w|.
There is no epsilon (as in the official code): a weight exactly on the grid gets no gradient
from the loss; weight decay, added by the optimizer afterwards, still moves it.
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError


def check_psg_bits(bits: int) -> None:
    """PSG's grid needs b >= 2: at 1 bit K = 2^0 - 1 = 0 and Delta = A / 0."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"PSG needs w_bits from 2 to 16, got {bits!r}: at 1 bit the symmetric "
                          "restricted grid has no level but 0 (use sparse mode or a binary "
                          "method)")


def psg_grid_step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Delta = max(|min(0, lo)|, max(0, hi)) / (2^(b-1) - 1)."""
    span = torch.maximum(-lo.clamp(max=0), hi.clamp(min=0))
    return (span / (2 ** (bits - 1) - 1)).clamp(min=torch.finfo(torch.float32).tiny)


def psg_quantize(w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) = Delta * round(clip(w / Delta, -K, K)); ``step`` broadcasts against ``w``."""
    k = 2 ** (bits - 1) - 1
    return torch.clamp(w / step, -k, k).round() * step


class PositionScaledGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``lambda_s * distance`` where
    ``distance`` = |w - target(w)| was computed at forward time."""

    @staticmethod
    def forward(ctx, w, distance, lambda_s: float):
        ctx.save_for_backward(distance)
        ctx.lambda_s = lambda_s
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (distance,) = ctx.saved_tensors
        return grad * (ctx.lambda_s * distance), None, None
