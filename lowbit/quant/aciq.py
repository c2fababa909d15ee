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

    ``rectified``: ``x`` is already a ReLU output (lowbit quantizes conv *inputs*; the reference
    quantizes conv outputs before the ReLU), so its mean and mean absolute deviation mix in the
    exact zeros. Above its median mu a Laplace(mu, b) is exactly mu + Exp(b), and a ReLU leaves
    that tail untouched, so mu = max(median(x), 0) and b = mean(x - mu | x > mu) (Gauss:
    sigma = RMS of that excess, a half-normal). Zeros cost no rounding noise, so the optimal
    one-sided alpha is still alpha_pos(M): lo = 0, hi = min(mu + alpha_pos(M) b, max(x)). A range
    past the largest value only wastes levels, hence the cap (the reference's ``clip2max``).
    """
    rows = channel_rows(x, axis)
    if rectified:
        mean = rows.median(1).values.clamp(min=0)
        above = (rows > mean[:, None]).float()
        excess = (rows - mean[:, None]) * above
        count = above.sum(1).clamp(min=1)
        spread = excess.sum(1) / count if prior == "laplace" else (excess.pow(2).sum(1) / count).sqrt()
        one_sided = True
    else:
        mean = rows.mean(1)
        spread = (rows - mean[:, None]).abs().mean(1) if prior == "laplace" else rows.std(1)
    bits_c = torch.as_tensor(bits).expand(rows.shape[0])
    factor = torch.tensor([aciq_alpha(int(b), prior, one_sided) for b in bits_c.tolist()])
    alpha = factor * spread
    if one_sided:
        lo, hi = torch.zeros_like(mean), mean.clamp(min=0) + alpha
        if rectified:
            hi = torch.minimum(hi, rows.amax(1))
    else:
        lo = torch.maximum(rows.amin(1), mean - alpha)
        hi = lo + 2 * alpha
    if axis is None:
        return lo[0], hi[0]
    return lo, hi
