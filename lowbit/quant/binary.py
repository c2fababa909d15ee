"""Binary and ternary quantizers with their gradients (ALGORITHMS.md 4.3-4.7).

* ``binarize``: sign with 0 -> +1 (BinaryConnect / BNN convention; ``torch.sign(0)`` is 0).
* BinaryConnect (Courbariaux et al. 2015): deterministic ``binarize(w)``, or stochastic +1 with
  probability ``hard_sigmoid(w) = clip((w + 1) / 2, 0, 1)``; plain straight-through gradient.
* BNN (Hubara et al. 2016): ``binarize`` for weights and activations with the hardtanh STE
  ``g_r = g_q * 1[|r| <= 1]``.
* BWN / XNOR-Net (Rastegari et al. 2016): ``W ~ alpha sign(W)``, alpha = mean|W| per output
  filter; inputs ``I ~ K sign(I)`` with ``K = (mean_c |I_c|) * box filter`` at the conv's
  kernel size, stride and padding.
* TWN (Li et al. 2016): ``Delta = 0.7 mean|W|``, ``alpha = mean{|W_i| : |W_i| > Delta}``,
  ``W_t = alpha sign(W) 1[|W| > Delta]``, STE.
* TTQ (Zhu et al. 2017): ``w_t = W^p`` above ``t max|W|``, ``-W^n`` below its negative, 0 in
  between, with trainable positive W^p, W^n; autograd-consistent gradients.
* ApproxSign (Bi-Real Net, Liu et al. 2018): the forward sign, the backward derivative of the
  piecewise quadratic ``F(x) = 2x - sign(x) x^2`` on [-1, 1] (+-1 outside), ``dF/dx = 2 - 2|x|``
  on |x| < 1 and 0 outside: a closer match to sign than the hardtanh STE's box.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def binarize(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, else -1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x + 1) / 2, 0, 1)


def stochastic_binarize(x: torch.Tensor, generator: torch.Generator | None = None):
    """+1 with probability hard_sigmoid(x), else -1 (BinaryConnect's stochastic mode)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(u < hard_sigmoid(x), 1.0, -1.0).to(x.dtype)


class SignSTE(torch.autograd.Function):
    """Forward ``binarize(x)``; backward the hardtanh STE ``g * 1[|x| <= 1]`` (BNN, XNOR)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return binarize(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1)


class ApproxSignSTE(SignSTE):
    """:class:`SignSTE`'s forward; backward Bi-Real Net's ApproxSign ``g * max(2 - 2|x|, 0)``."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_min(0)


SIGN_GRADIENTS = {"ste": SignSTE, "approx": ApproxSignSTE}


class IdentitySTE(torch.autograd.Function):
    """Forward a precomputed quantized tensor; backward the gradient unchanged to the latent
    weights (BinaryConnect, TWN: the latent weights are clipped to [-1, 1] instead)."""

    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bwn_alpha(w: torch.Tensor) -> torch.Tensor:
    """alpha = mean|W| per output filter (axis 0), shaped to broadcast against ``w``."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


def xnor_input_scale(x: torch.Tensor, kernel_size, stride, padding, dilation=1) -> torch.Tensor:
    """K = (mean over channels of |x|) convolved with a 1/(k_h k_w) box filter using the conv's
    stride, zero padding and dilation: one beta per output position, shape [N, 1, H_out, W_out].

    The sums run in a fixed order (channels 0..C-1, then the taps row by row, padding adding
    0), followed by one multiplication by 1 / (C k_h k_w). The deployed popcount kernel fuses the
    same sums into its sign-packing and im2col passes and so reproduces K bit for bit, which a
    library mean and average pooling (free to sum in any order) would not guarantee.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel_size, stride, padding,
                                                                  dilation))
    magnitude = x.abs()
    total = magnitude[:, 0]
    for c in range(1, x.shape[1]):
        total = total + magnitude[:, c]
    padded = F.pad(total, (pw, pw, ph, ph))
    oh = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    box = None
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            tap = padded[:, y0:y0 + sh * (oh - 1) + 1:sh, x0:x0 + sw * (ow - 1) + 1:sw]
            box = tap if box is None else box + tap
    return (box * (1.0 / (x.shape[1] * kh * kw))).unsqueeze(1)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def twn_ternarize(w: torch.Tensor, ratio: float = 0.7) -> torch.Tensor:
    """alpha sign(W) 1[|W| > Delta] with Delta = ratio * mean|W| and alpha the mean |W| above it
    (per layer)."""
    a = w.abs()
    delta = ratio * a.mean()
    mask = a > delta
    alpha = a[mask].mean() if mask.any() else a.new_zeros(())
    return alpha * torch.sign(w) * mask


class TTQTernarize(torch.autograd.Function):
    """w_t = W^p 1[w > D] - W^n 1[w < -D], D = t max|w| (TTQ).

    Gradients (autograd-consistent): dL/dW^p = sum_{I_p} g, dL/dW^n = -sum_{I_n} g; the latent
    weights get W^p g on I_p, g on the zero band, W^n g on I_n (the paper's scaled STE).
    """

    @staticmethod
    def forward(ctx, w, w_p, w_n, t: float):
        delta = t * w.abs().max()
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, w_p, w_n)
        return w_p * pos - w_n * neg

    @staticmethod
    def backward(ctx, grad):
        pos, neg, w_p, w_n = ctx.saved_tensors
        zero = ~(pos | neg)
        grad_w = grad * (w_p * pos + zero + w_n * neg)
        return grad_w, (grad * pos).sum().reshape(w_p.shape), \
            -(grad * neg).sum().reshape(w_n.shape), None
