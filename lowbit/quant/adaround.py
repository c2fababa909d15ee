"""AdaRound: learned rounding of weights (Nagel, Amjad, van Baalen, Louizos, Blankevoort,
"Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Rounding each weight to its nearest grid point minimises the weight error, not the layer's
output error. AdaRound keeps the grid (scale, zero point, range) and learns, per weight, whether
to round down or up. The soft integer weight is

    W~ = S * (clamp(floor(W / S) + h(V) + Z, q_min, q_max) - Z)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

(the rectified sigmoid, eq. 23), and V minimises the layer-output reconstruction error plus a
regulariser that drives every h(V) to 0 or 1 (eq. 21 and 24):

    || W x_fp - W~ x_q ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

x_q is the input the *quantized* network feeds this layer and W x_fp the float network's output
(the paper's "asymmetric reconstruction", Sec. 4.3), so the rounding also absorbs the error of
the layers before it. beta anneals linearly from 20 to 2 after a warm-up (20 % of the
iterations) without the regulariser; lambda = 0.01; Adam. V starts where h(V) equals the
fractional part of W / S, i.e. W~ starts at W. At the end h(V) >= 0.5 rounds up.

The reconstruction error is summed over output channels and averaged over the batch and the
spatial positions, the normalisation of the public BRECQ / AdaRound code, which makes
lambda = 0.01 meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSchedule:
    """Optimisation settings (paper defaults except ``iters``, which trades time for accuracy)."""

    iters: int = 1000
    batch: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    def beta(self, step: int) -> float | None:
        """Regulariser exponent at ``step``; None during the warm-up (no regulariser)."""
        start = self.warmup * self.iters
        if step < start:
            return None
        progress = (step - start) / max(self.iters - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (AdaRound eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_logits(fraction: torch.Tensor) -> torch.Tensor:
    """V with h(V) == ``fraction`` (in [0, 1)): the inverse of the rectified sigmoid."""
    p = ((fraction - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(V) - 1|^beta): zero exactly when every h(V) is 0 or 1 (eq. 24)."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def reconstruction_error(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (axis 1), averaged over everything else."""
    return (y - target).pow(2).sum(1).mean()


def learn_rounding(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: torch.Tensor, qmax: torch.Tensor,
                   forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   inputs: torch.Tensor, targets: torch.Tensor,
                   schedule: AdaRoundSchedule = AdaRoundSchedule(),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The dequantized weight with learned rounding (on the grid given by the qparams).

    Qparams arrive shaped to broadcast against ``weight``. ``forward(x, w)`` is the layer's
    float operation with weight ``w``; ``inputs`` are the quantized-network inputs and
    ``targets`` the float-network outputs on the same images.
    """
    weight = weight.detach()
    floor = torch.floor(weight * (1.0 / scale))
    v = initial_logits(weight * (1.0 / scale) - floor).requires_grad_(True)
    lo, hi = qmin - zero_point, qmax - zero_point

    def soft_weight(h):
        return torch.clamp(floor + h, lo, hi) * scale

    optimizer = torch.optim.Adam([v], lr=schedule.lr)
    n = len(inputs)
    with torch.enable_grad():  # callers calibrate under no_grad
        for step in range(schedule.iters):
            idx = torch.randint(n, (min(schedule.batch, n),), generator=generator)
            y = forward(inputs[idx], soft_weight(rectified_sigmoid(v)))
            loss = reconstruction_error(y, targets[idx])
            beta = schedule.beta(step)
            if beta is not None:
                loss = loss + schedule.reg_weight * rounding_regularizer(v, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return soft_weight((rectified_sigmoid(v) >= 0.5).to(weight.dtype))
