"""Per-channel bit allocation (Banner, Nahshan, Soudry 2019, eq. 10-11; code ``get_bits_alloc``).

Minimising the total rounding noise sum_i alpha_i^2 / (3 B_i^2) under a fixed bin budget
sum_i B_i = B gives B_i* = B alpha_i^(2/3) / sum_j alpha_j^(2/3), i.e. with a target of T bits:

    p_i = alpha_i^(2/3),   bins_i = C 2^T p_i / sum p,   bits_i = round(log2 bins_i)

clamped to [min_bits, max_bits]. Rounding breaks the budget slightly, so (as the reference code)
T is adjusted up to 10 times by half the shortfall until mean(bits) is within 0.05 of the goal.
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError


def _allocate(p: torch.Tensor, target: float, min_bits: int, max_bits: int, mode: str):
    bins = p.numel() * 2.0**target * p / p.sum()
    raw = torch.log2(bins)
    bits = torch.round(raw) if mode == "round" else torch.ceil(raw)
    return bits.clamp(min_bits, max_bits).to(torch.int64)


def allocate_bits(alpha: torch.Tensor, target: float, min_bits: int = 1, max_bits: int = 8,
                  mode: str = "round", tolerance: float = 0.05, iterations: int = 10):
    """Integer bits per channel whose mean stays within ``tolerance`` of ``target``.

    ``alpha`` is each channel's clipping value (or anything proportional to it: std for
    weights, b or sigma for activations). Channels with alpha = 0 (all-zero / constant) get
    ``min_bits``. The reference clamps to [0, 8]; lowbit keeps at least 1 bit by default because a
    0-bit channel carries only a constant.
    """
    if mode not in ("round", "ceil"):
        raise ConfigError(f"bit-allocation mode must be 'round' or 'ceil', got {mode!r}")
    alpha = alpha.detach().double().flatten()
    if alpha.numel() == 0:
        raise ConfigError("bit allocation needs at least one channel")
    p = alpha.clamp(min=0).pow(2.0 / 3.0)
    if p.sum() == 0:
        return torch.full_like(alpha, int(round(target)), dtype=torch.int64)
    # A channel with alpha = 0 would get log2(0) = -inf; it needs no bins, give it the floor.
    p = torch.where(p > 0, p, p[p > 0].min() * 1e-6)
    t = float(target)
    best = _allocate(p, t, min_bits, max_bits, mode)
    for _ in range(iterations):
        bits = _allocate(p, t, min_bits, max_bits, mode)
        gap = target - bits.double().mean().item()
        if abs(gap) < abs(target - best.double().mean().item()):
            best = bits
        if abs(gap) <= tolerance:
            return bits
        t += gap / 2
    return best
