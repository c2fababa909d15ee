"""PSG in the weight slot: a module that leaves the weight unchanged in the forward pass and
scales its gradient by lambda_s * |w - Q(w)| in the backward pass (see :mod:`lowbit.quant.psg`).

The grid follows the current weights: the exact min / max of this forward (default), or, with
``ema_momentum``, an exponential moving average of them as in the reference code (momentum 0.1,
first call exact), whose lag lets weights beyond the range get multipliers above Delta / 2.
The EMA lives in buffers so checkpoints and resume keep it. In eval mode it is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.quantizer import LazyBuffers
from lowbit.quant.affine import broadcast_along
from lowbit.quant.psg import PositionScaledGradient, check_psg_bits, psg_grid_step, \
    psg_quantize
from lowbit.quant.ranges import ema_update, minmax_range


class PSGGradientScaler(LazyBuffers, nn.Module):
    lazy_buffers = ("running_min", "running_max")

    def __init__(self, bits: int, lambda_s: float, per_channel: bool = False,
                 ema_momentum: float | None = None, sparse: bool = False, name: str = ""):
        super().__init__()
        if not sparse:
            check_psg_bits(bits)
        self.bits, self.lambda_s, self.sparse, self.name = bits, lambda_s, sparse, name
        self.axis = 0 if per_channel else None
        self.ema_momentum = ema_momentum
        self.register_buffer("running_min", torch.empty(0))
        self.register_buffer("running_max", torch.empty(0))

    @torch.no_grad()
    def distance(self, w: torch.Tensor) -> torch.Tensor:
        """|w - target(w)|: to the grid, or to 0 in sparse mode."""
        if self.sparse:
            return w.abs()
        lo, hi = minmax_range(w, self.axis)
        if self.ema_momentum is not None:
            if self.running_min.numel():
                lo = ema_update(self.running_min, lo, self.ema_momentum)
                hi = ema_update(self.running_max, hi, self.ema_momentum)
            self.running_min, self.running_max = lo, hi
        step = broadcast_along(psg_grid_step(lo, hi, self.bits), w, self.axis)
        return (w - psg_quantize(w, step, self.bits)).abs()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not (self.training and w.requires_grad):
            return w
        return PositionScaledGradient.apply(w, self.distance(w), self.lambda_s)

    def extra_repr(self) -> str:
        target = "0 (sparse)" if self.sparse else f"{self.bits}-bit grid"
        return f"lambda_s={self.lambda_s}, target={target}, axis={self.axis}"
