"""Range estimators: which real interval [lo, hi] a quantizer should cover.

Each takes a tensor and an optional channel ``axis`` and returns ``(lo, hi)``: scalars for
per-tensor ranges, 1-D tensors of length C for per-channel ones. ACIQ lives in ``aciq.py``.
"""
from __future__ import annotations

import torch

from lowbit.quant.affine import affine_qparams, fake_quantize


def channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View ``x`` as a [C, N] matrix, one row per channel along ``axis`` (one row if None)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _out(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    return t[0] if axis is None else t


def minmax_range(x: torch.Tensor, axis: int | None = None):
    """lo = min(x), hi = max(x) (per channel along ``axis``)."""
    rows = channel_rows(x, axis)
    return _out(rows.amin(1), axis), _out(rows.amax(1), axis)


def percentile_range(x: torch.Tensor, percentile: float = 99.99, axis: int | None = None):
    """lo / hi at the (100 - p)-th / p-th percentile of ``x`` (outlier-robust min / max)."""
    rows = channel_rows(x, axis)
    n = rows.shape[1]
    k_hi = min(n, max(1, int(round(percentile / 100.0 * n))))
    k_lo = max(1, n - k_hi + 1)
    hi = rows.kthvalue(k_hi, dim=1).values
    lo = rows.kthvalue(k_lo, dim=1).values
    return _out(lo, axis), _out(hi, axis)


def mse_range(x: torch.Tensor, qmin, qmax, symmetric: bool, axis: int | None = None,
              steps: int = 100, floor: float = 0.05):
    """The range that minimises the fake-quantization MSE ``E[(x - Q(x))^2]`` per channel.

    Candidates shrink the min-max range by a common ratio r in [floor, 1] on a grid of ``steps``
    values (the search of Brevitas / PyTorch's HistogramObserver in spirit, done on the values
    themselves), all evaluated at once in chunks of about 2^24 elements. ``qmin`` / ``qmax`` may
    be per-channel tensors (bit allocation).
    """
    rows = channel_rows(x, axis)
    c, n = rows.shape
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    qmin_c = torch.as_tensor(qmin, dtype=torch.float32).expand(c)
    qmax_c = torch.as_tensor(qmax, dtype=torch.float32).expand(c)
    ratios = torch.linspace(floor, 1.0, steps)
    errors = []
    for chunk in ratios.split(max(1, (1 << 24) // max(1, c * n))):
        r = chunk[:, None]  # [R, 1] against per-channel [C]
        scale, zp = affine_qparams(lo * r, hi * r, qmin_c, qmax_c, symmetric)  # [R, C]
        fq = fake_quantize(rows.unsqueeze(0), scale[..., None], zp[..., None],
                           qmin_c[:, None], qmax_c[:, None])
        errors.append((fq - rows).pow(2).mean(2))  # [R, C]
    best = ratios[torch.cat(errors).argmin(0)]  # first (smallest) ratio on ties
    return _out(lo * best, axis), _out(hi * best, axis)


def ema_update(old: torch.Tensor | None, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """Exponential moving average of a range (Jacob et al. 2018; MIT lecture 6).

    r_hat_t = momentum * r_t + (1 - momentum) * r_hat_{t-1}; the first call (old is None)
    initialises r_hat = r_t. PyTorch's MovingAverageMinMaxObserver uses momentum 0.01,
    the PSG reference 0.1.
    """
    if old is None:
        return new.clone()
    return momentum * new + (1.0 - momentum) * old


def bn_activation_range(beta: torch.Tensor, gamma: torch.Tensor, n: float = 6.0,
                        signed_gamma: bool = False, per_channel: bool = False):
    """Data-free range of a ReLU following a BatchNorm (DFQ, Nagel et al. 2019; PSG eval.py).

    The BN output of channel c is modelled as N(beta_c, gamma_c^2), so the range is
    ``lo = 0, hi = max_c(beta_c + n * |gamma_c|)`` (or per channel). The PSG reference uses the
    signed gamma (``signed_gamma=True``), which under-estimates channels with negative gamma;
    lowbit defaults to |gamma|, the standard deviation the model actually implies.
    """
    g = gamma.detach() if signed_gamma else gamma.detach().abs()
    hi = (beta.detach() + n * g).clamp(min=0.0)
    hi = hi if per_channel else hi.max()
    return torch.zeros_like(hi), hi


def channel_sample(x: torch.Tensor, axis: int | None, max_total: int = 1 << 17,
                   seed: int = 0) -> torch.Tensor:
    """At most ``max_total`` values of ``x`` as a [C, K] matrix (one row per channel along
    ``axis``; one row if None), the same random positions for every channel.

    Range searches (MSE, percentiles, ACIQ statistics) on a large activation only need a random
    sample; indexing the positions avoids copying the whole tensor into channel-major order, and
    the fixed seed keeps calibration deterministic.
    """
    x = x.detach().float()
    xt = x.reshape(1, -1) if axis is None else x.movedim(axis, 0)
    rest = xt.shape[1:]
    positions = xt[0].numel()
    keep = max(1, max_total // xt.shape[0])
    if positions <= keep:
        return xt.reshape(xt.shape[0], -1)
    # With replacement: randperm of a 16M-position activation would cost a second per layer.
    idx = torch.randint(positions, (keep,), generator=torch.Generator().manual_seed(seed))
    return xt[(slice(None), *torch.unravel_index(idx, rest))]
