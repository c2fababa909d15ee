"""ACIQ: analytical clipping for integer quantization (Banner, Nahshan, Soudry, NeurIPS 2019).

A tensor modelled as Laplace(mu, b) (or Gauss(mu, sigma)) is clipped to [mu - alpha, mu + alpha]
and quantized with 2^M bins; the expected MSE is

    Laplace: 2 b^2 exp(-alpha / b)                                           + alpha^2 / (3 4^M)
    Gauss:   (s^2 + a^2)(1 - erf(a / (s sqrt 2))) - sqrt(2/pi) a s exp(-a^2 / (2 s^2)) + a^2 / (3 4^M)

and alpha* = argmin, solved numerically for any M (so alpha*(M) / b is exact, not a table).
One-sided (post-ReLU) tensors spread M bits over [0, alpha], the step M+1 bits give over
[-alpha, alpha], hence alpha_pos(M) = alpha(M + 1) (reference ``alpha_*_positive`` tables).
"""
from __future__ import annotations

from functools import lru_cache

import math

import torch
from scipy.optimize import minimize_scalar
from scipy.special import erf

from lowbit.errors import ConfigError
from lowbit.quant.ranges import channel_rows

PRIORS = ("laplace", "gauss")


def _laplace_mse(alpha: float, bits: float) -> float:
    return 2.0 * math.exp(-alpha) + alpha**2 / (3.0 * 4.0**bits)


def _gauss_mse(alpha: float, bits: float) -> float:
    clip = (1.0 + alpha**2) * (1.0 - erf(alpha / math.sqrt(2.0)))
    clip -= math.sqrt(2.0 / math.pi) * alpha * math.exp(-alpha**2 / 2.0)
    return clip + alpha**2 / (3.0 * 4.0**bits)


@lru_cache(maxsize=None)
def aciq_alpha(bits: int, prior: str = "laplace", one_sided: bool = False) -> float:
    """alpha* / b (Laplace) or alpha* / sigma (Gauss) minimising the clipping + rounding MSE."""
    if prior not in PRIORS:
        raise ConfigError(f"ACIQ prior must be one of {PRIORS}, got {prior!r}")
    m = bits + 1 if one_sided else bits
    mse = _laplace_mse if prior == "laplace" else _gauss_mse
    return float(minimize_scalar(lambda a: mse(a, m), bounds=(1e-3, 64.0), method="bounded",
                                 options={"xatol": 1e-9}).x)


def aciq_range(x: torch.Tensor, bits, prior: str = "laplace", axis: int | None = None,
               one_sided: bool = False, rectified: bool = False):
    """Clipping range of ``x`` per ACIQ (reference ``alpha2DeltaOffset``).

    b = mean|x - mean x| (mean absolute deviation, per channel over all other dims),
    sigma = unbiased std. Two-sided: lo = max(min, mean - alpha), hi = lo + 2 alpha.
    One-sided (a ReLU follows): lo = 0, hi = max(mean, 0) + alpha_pos. ``bits`` may be a
    per-channel tensor (bit allocation): each channel uses the alpha of its own bit width.

    ``rectified``: ``x`` is already a ReLU output (lowbit quantizes conv *inputs*, the reference
    quantizes conv outputs before the ReLU). Half of such a tensor may be exact zeros, which
    makes the mean absolute deviation under-estimate b by about 40%. The positive part of a
    Laplace(mu <= 0, b) is exactly Exp(b) (memoryless), so b = mean of the positive values; for
    the Gauss prior the positive part of N(0, sigma) is half-normal, so sigma = RMS of the
    positive values. Then lo = 0, hi = alpha_pos(M) * b.
    """
    rows = channel_rows(x, axis)
    if rectified:
        positive = (rows > 0).float()
        count = positive.sum(1).clamp(min=1)
        if prior == "laplace":
            spread = (rows * positive).sum(1) / count
        else:
            spread = ((rows * positive).pow(2).sum(1) / count).sqrt()
        mean, one_sided = torch.zeros_like(spread), True
    else:
        mean = rows.mean(1)
        spread = (rows - mean[:, None]).abs().mean(1) if prior == "laplace" else rows.std(1)
    bits_c = torch.as_tensor(bits).expand(rows.shape[0])
    factor = torch.tensor([aciq_alpha(int(b), prior, one_sided) for b in bits_c.tolist()])
    alpha = factor * spread
    if one_sided:
        lo, hi = torch.zeros_like(mean), mean.clamp(min=0) + alpha
    else:
        lo = torch.maximum(rows.amin(1), mean - alpha)
        hi = lo + 2 * alpha
    if axis is None:
        return lo[0], hi[0]
    return lo, hi
