"""Learned Step Size Quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, ICLR 2020).

Forward, with step s > 0 and integer bounds Q_N, Q_P::

    v_bar = round(clip(v / s, -Q_N, Q_P))        v_hat = v_bar * s

Backward (the paper's eq. 3 and the clipped straight-through estimator)::

    d v_hat / d v = 1                 if -Q_N < v/s < Q_P, else 0
    d v_hat / d s = round(v/s) - v/s  if -Q_N < v/s < Q_P
                  = -Q_N              if v/s <= -Q_N
                  = Q_P               if v/s >= Q_P

and dL/ds is multiplied by the gradient scale g = 1 / sqrt(N * Q_P).

PyTorch's ``_fake_quantize_learnable_per_{tensor,channel}_affine`` agree everywhere except in
the half-step bands Q_P <= v/s < Q_P + 1/2 and -Q_N - 1/2 < v/s < -Q_N: they decide "inside" on
the *rounded* value, so there they pass dv = 1 and ds = Q_P - v/s. lowbit follows the paper.
"""
from __future__ import annotations

import math

import torch

from lowbit.quant.ranges import channel_sample


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): signed data uses the full range [-2^(b-1), 2^(b-1) - 1] (the paper's final
    version), unsigned [0, 2^b - 1]."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def lsq_initial_step(v: torch.Tensor, q_p: int, axis: int | None = None) -> torch.Tensor:
    """s_0 = 2 mean|v| / sqrt(Q_P) (per channel along ``axis`` if given)."""
    a = v.detach().abs()
    mean = a.mean() if axis is None else a.transpose(0, axis).reshape(a.shape[axis], -1).mean(1)
    return 2 * mean / math.sqrt(q_p)


def lsq_mse_step(v: torch.Tensor, q_n: int, q_p: int, axis: int | None = None,
                 steps: int = 100, floor: float = 0.05) -> torch.Tensor:
    """The step s that minimises E[(v - round(clip(v/s, -Q_N, Q_P)) s)^2] (per channel along
    ``axis``), searched over s = r max|v| / Q_P for r on a grid of ``steps`` values in [floor, 1].

    An option of lowbit's, not the paper's: LSQ then starts where MSE-optimal post-training
    quantization would put the grid (the initialisation LSQ+ and later work use) instead of at
    2 mean|v| / sqrt(Q_P), so a short fine-tuning on little data does not spend itself finding
    the range. A large activation is searched on a fixed random sample of its values.
    (:func:`lowbit.quant.ranges.mse_range` searches affine ranges, whose symmetric step is
    range / ((Q_P + Q_N) / 2); LSQ's grid is s times the integers -Q_N..Q_P, searched here.)
    """
    rows = channel_sample(v, axis)
    top = rows.abs().amax(1).clamp(min=1e-8) / q_p                         # [C]
    ratios = torch.linspace(floor, 1.0, steps)
    errors = []
    for chunk in ratios.split(max(1, (1 << 24) // max(1, rows.numel()))):
        s = (chunk[:, None] * top)[..., None]                               # [R, C, 1]
        q = torch.clamp(torch.round(rows / s), -q_n, q_p) * s
        errors.append((q - rows).pow(2).mean(2))                            # [R, C]
    best = ratios[torch.cat(errors).argmin(0)] * top
    return best if axis is not None else best.reshape(())


def lsq_grad_scale(n: int, q_p: int) -> float:
    """g = 1 / sqrt(N Q_P)."""
    return 1.0 / math.sqrt(n * q_p)


class LSQFakeQuantize(torch.autograd.Function):
    """v_hat = round(clip(v/s, -Q_N, Q_P)) * s with the paper's gradients for v and s.

    ``step`` arrives shaped to broadcast against ``x`` (a scalar, or per channel); its gradient
    is summed back to that shape and multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, x, step, q_n: int, q_p: int, grad_scale: float):
        v = x / step
        v_bar = torch.clamp(v, -q_n, q_p).round_()
        ctx.save_for_backward(v, v_bar, step)
        ctx.q_n, ctx.q_p, ctx.grad_scale = q_n, q_p, grad_scale
        return v_bar * step

    @staticmethod
    def backward(ctx, grad):
        v, v_bar, step = ctx.saved_tensors
        grad_x = grad * ((v > -ctx.q_n) & (v < ctx.q_p))
        # d v_hat / d s is v_bar - v inside and v_bar (= -Q_N or Q_P) outside, so
        # sum(grad * d) = sum(grad * v_bar) - sum(grad_x * v): two dot products, no temporaries.
        if step.numel() == 1:
            total = grad.reshape(-1) @ v_bar.reshape(-1) - grad_x.reshape(-1) @ v.reshape(-1)
            grad_step = (total * ctx.grad_scale).reshape(step.shape)
        else:
            grad_step = ((grad * v_bar - grad_x * v) * ctx.grad_scale).sum_to_size(step.shape)
        return grad_x, grad_step, None, None, None
