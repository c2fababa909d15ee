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

The reconstruction error is summed over output channels and averaged over the images and the
spatial positions, the normalisation of the public BRECQ / AdaRound code, which makes
lambda = 0.01 meaningful. For a Conv2d or Linear layer it is a quadratic form in the weight
(:class:`ReconstructionError`), accumulated once over the calibration set; each step then costs
one ``K x K`` product per output channel group instead of two convolutions of a minibatch, and
optimises the error on the whole set (the paper's expectation) rather than a 32-image estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.quant.observer import image_positions

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundSchedule:
    """Optimisation settings (paper defaults except ``iters``, which trades time for accuracy)."""

    iters: int = 1000
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


class ReconstructionError:
    """:func:`reconstruction_error` of a Conv2d / Linear layer as a function of its weight,
    accumulated batch by batch over the calibration set.

    Output channel ``o`` at output position ``p`` is ``w_o . x_p + b_o`` with ``x_p`` the input
    patch (im2col; for a grouped convolution, the patch of ``o``'s group). With ``t`` the float
    network's output there and ``r = t - b``::

        E_p sum_o (w_o . x_p - r_po)^2 = sum_g tr(W_g H_g W_g^T) - 2 tr(W_g G_g) + c
        H_g = E[x x^T]  (K x K),   G_g = E[x r^T],   c = E ||r||^2

    (the layer-wise Hessian of OBQ / GPTQ, H = 2 E[x x^T]). Sums run in float64 over at most
    ``max_patches`` positions of the whole set: image ``i`` contributes
    ``ceil(max_patches / N)`` positions (:func:`lowbit.quant.observer.image_positions`, as the
    range observer samples; all of them where they fit), so the result does not depend on the
    batching.
    """

    def __init__(self, layer: nn.Module, total_images: int, max_patches: int = 1 << 18,
                 seed: int = 0):
        self.layer, self.total_images, self.seed = layer, total_images, seed
        self.max_patches = max_patches
        self.groups = getattr(layer, "groups", 1)
        self.h = self.g = None
        self.c, self.count, self.seen = 0.0, 0, 0

    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: the layer's (quantized) input ``x`` and the float output ``target``."""
        bias = self.layer.bias
        r = target.detach() if bias is None else \
            target.detach() - bias.detach().reshape(1, -1, *([1] * (target.dim() - 2)))
        for start in range(0, len(x), self._chunk(x)):
            part = slice(start, start + self._chunk(x))
            patches, residual = self._patches(x[part]), self._rows(r[part])  # [n, g, K|O, P]
            picks = self._picks(len(patches), patches.shape[-1])
            if picks is not None:
                index = picks.to(patches.device)[:, None, None, :]
                patches = patches.gather(3, index.expand(*patches.shape[:3], -1))
                residual = residual.gather(3, index.expand(*residual.shape[:3], -1))
            xs = patches.permute(1, 0, 3, 2).reshape(self.groups, -1, patches.shape[2])
            rs = residual.permute(1, 0, 3, 2).reshape(self.groups, -1, residual.shape[2])
            h, g = (xs.transpose(1, 2) @ xs).double(), (xs.transpose(1, 2) @ rs).double()
            self.h = h if self.h is None else self.h + h
            self.g = g if self.g is None else self.g + g
            self.c += float(rs.double().pow(2).sum())
            self.count += xs.shape[1]
            self.seen += len(patches)

    def _chunk(self, x: torch.Tensor) -> int:
        """Images per unfold, keeping the patch matrix near 2^24 values."""
        per_image = x[0].numel() * math.prod(getattr(self.layer, "kernel_size", (1,)))
        return max(1, (1 << 24) // per_image)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not isinstance(layer, nn.Conv2d):  # Linear: every leading position is a patch
            return x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded = F.pad(x, layer._reversed_padding_repeated_twice, mode)
        cols = F.unfold(padded, layer.kernel_size, layer.dilation, 0, layer.stride)
        return cols.reshape(len(x), self.groups, -1, cols.shape[-1])

    def _rows(self, r: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.layer, nn.Conv2d):
            return r.reshape(len(r), -1, r.shape[-1]).transpose(1, 2).unsqueeze(1)
        return r.reshape(len(r), self.groups, -1, r[0, 0].numel())

    def _picks(self, n: int, positions: int) -> torch.Tensor | None:
        per_image = math.ceil(self.max_patches / self.total_images)
        if per_image >= positions:
            return None
        return image_positions(self.seen, n, positions, per_image, self.seed)

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """H, G^T and c as float32 means (the float64 sums are converted once, at first use)."""
        if not isinstance(self.h, tuple):
            self.h = ((self.h / self.count).float(), (self.g / self.count).float().transpose(1, 2),
                      self.c / self.count)
        return self.h

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """The reconstruction error of the layer with ``weight``."""
        h, g_t, c = self._moments()
        w = weight.reshape(self.groups, -1, h.shape[-1])
        return ((w @ h) * w).sum() - 2 * (w * g_t).sum() + c

    def gradient(self, weight: torch.Tensor) -> torch.Tensor:
        """d error / d weight = 2 (W H - G^T), shaped like ``weight``."""
        h, g_t, _ = self._moments()
        w = weight.reshape(self.groups, -1, h.shape[-1])
        return (2 * (w @ h - g_t)).reshape(weight.shape)


def learn_rounding(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: torch.Tensor, qmax: torch.Tensor, error: ReconstructionError,
                   schedule: AdaRoundSchedule = AdaRoundSchedule()) -> torch.Tensor:
    """The dequantized weight with learned rounding (on the grid given by the qparams).

    Qparams arrive shaped to broadcast against ``weight``. ``error`` is the layer's
    reconstruction error (the quantized network's input against the float network's output);
    only its :meth:`~ReconstructionError.gradient` is used.
    """
    weight = weight.detach()
    floor = torch.floor(weight * (1.0 / scale))
    v = initial_logits(weight * (1.0 / scale) - floor).requires_grad_(True)
    lo, hi = qmin - zero_point, qmax - zero_point
    optimizer = torch.optim.Adam([v], lr=schedule.lr, fused=True)
    for step in range(schedule.iters):
        v.grad = _rounding_gradient(v.detach(), floor, lo, hi, scale, error,
                                    schedule.beta(step), schedule.reg_weight)
        optimizer.step()
    hard = (rectified_sigmoid(v.detach()) >= 0.5).to(weight.dtype)
    return torch.clamp(floor + hard, lo, hi) * scale


def _rounding_gradient(v, floor, lo, hi, scale, error: ReconstructionError, beta: float | None,
                       reg_weight: float) -> torch.Tensor:
    """d/dV of ``error(W~) + reg_weight * rounding_regularizer(V, beta)`` (no regulariser
    while ``beta`` is None), by the chain rule through the module docstring's W~ and h(V):

        dW~/dh = S [lo <= floor + h <= hi],   dh/dV = (zeta - gamma) s (1 - s) [0 <= h_raw <= 1]
        d reg / dh = -2 beta |2h - 1|^(beta - 1) sign(2h - 1),   s = sigmoid(V)

    Written out rather than left to autograd: the step is a dozen elementwise ops on a small
    tensor, and recording and replaying them cost more than the K x K product itself (the
    masks are those of autograd's clamp, so the two agree; tests check it).
    """
    s = torch.sigmoid(v)
    h_raw = s * (ZETA - GAMMA) + GAMMA
    h = h_raw.clamp(0.0, 1.0)
    q = floor + h
    weight = q.clamp(lo, hi) * scale
    grad_h = error.gradient(weight) * scale * ((q >= lo) & (q <= hi))
    if beta is not None:
        t = 2 * h - 1
        grad_h -= reg_weight * 2 * beta * t.abs().pow(beta - 1) * t.sign()
    return grad_h * ((ZETA - GAMMA) * s * (1 - s)) * ((h_raw >= 0) & (h_raw <= 1))
