"""Binary and ternary quantizers for the wrapper slots, and the XNOR-Net convolution
(see :mod:`lowbit.quant.binary` for the formulas and papers).

Weight slot: :class:`BinaryWeight` (BinaryConnect deterministic / stochastic, BNN),
:class:`ScaledBinaryWeight` (BWN, XNOR-Net), :class:`TernaryWeight` (TWN), :class:`TTQWeight`.
Input slot: :class:`SignActivation` (BNN, XNOR-Net; ReActNet's RSign threshold and Bi-Real's
ApproxSign gradient as options). :class:`XNORConv2d` multiplies the binary convolution by the K
map of its real input (XNOR-Net's beta per output position), treated as a constant in the
backward pass. :class:`RPReLU` is ReActNet's activation after a real-valued shortcut. Each weight
quantizer reports ``storage_bits`` for size reports. The binary weight quantizers have an
``enabled`` switch: off, they pass the real weight through (the first stage of a two-stage
run, binary activations with real weights).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.nn.layers import QuantConv2d
from lowbit.quant.binary import (SIGN_GRADIENTS, IdentitySTE, SignSTE, TTQTernarize, binarize,
                                 bwn_alpha, stochastic_binarize, twn_ternarize, xnor_input_scale)


class BinaryWeight(nn.Module):
    """BinaryConnect: sign(w) (0 -> +1), or in training with ``stochastic`` +1 with probability
    hard_sigmoid(w); the gradient passes straight to the latent weights, which the method clips
    to [-1, 1] after every update. Evaluation is deterministic (the deployable network)."""

    enabled = True

    def __init__(self, stochastic: bool = False):
        super().__init__()
        self.stochastic = stochastic

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.stochastic and self.training:
            return IdentitySTE.apply(w, stochastic_binarize(w.detach()))
        return IdentitySTE.apply(w, binarize(w.detach()))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return weight.numel()


class ScaledBinaryWeight(nn.Module):
    """BWN: alpha sign(W), alpha = mean|W| per output filter. alpha is not detached, so autograd
    gives the exact chain rule (1/n) sign(W_i) sum_j g_j sign(W_j) + alpha 1[|W_i| <= 1] g_i."""

    enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha, signs = self.factors(w)
        return alpha * signs

    def factors(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha [O, 1, ...], sign(W)), both carrying their gradients; (1, W) when disabled."""
        if not self.enabled:
            return w.new_ones((len(w),) + (1,) * (w.dim() - 1)), w
        return bwn_alpha(w), SignSTE.apply(w)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return weight.numel() + 32 * weight.shape[0]  # one float32 alpha per filter


class TernaryWeight(nn.Module):
    """TWN: alpha sign(W) 1[|W| > 0.7 mean|W|], recomputed every step, straight-through."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return IdentitySTE.apply(w, twn_ternarize(w.detach()))

    def storage_bits(self, weight: torch.Tensor) -> int:
        return 2 * weight.numel() + 32  # 2-bit codes and alpha


class TTQWeight(nn.Module):
    """TTQ with trainable positive scales W^p, W^n (one pair per layer) and threshold t max|W|.

    The scales start at the mean |W| of the weights above / below the threshold (the TWN-optimal
    values), so fine-tuning starts close to the float layer; the official code starts them at
    1.0 and relies on the following BatchNorm to absorb the scale.
    """

    def __init__(self, threshold: float = 0.05):
        super().__init__()
        self.threshold = threshold
        self.w_p = nn.Parameter(torch.tensor(1.0))
        self.w_n = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, w: torch.Tensor) -> None:
        delta = self.threshold * w.abs().max()
        for scale, part in ((self.w_p, w[w > delta]), (self.w_n, -w[w < -delta])):
            scale.fill_(part.mean().item() if part.numel() else 1.0)
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(w)
        return TTQTernarize.apply(w, self.w_p, self.w_n, self.threshold)

    def storage_bits(self, weight: torch.Tensor) -> int:
        return 2 * weight.numel() + 64  # 2-bit codes, W^p and W^n


class SignActivation(nn.Module):
    """Binary input: ``sign(x - t)`` (0 -> +1). ``t`` is 0, or with ``channels`` ReActNet's RSign
    (Liu et al. 2020): a learnable threshold per input channel, starting at 0. The gradient is
    the hardtanh STE ``1[|x - t| <= 1]`` (``gradient="ste"``) or Bi-Real Net's ApproxSign
    ``max(2 - 2|x - t|, 0)`` (``"approx"``)."""

    def __init__(self, channels: int = 0, gradient: str = "ste"):
        super().__init__()
        self.gradient = gradient
        self.threshold = nn.Parameter(torch.zeros(channels)) if channels else None

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """``x - t`` (``x`` itself without a threshold), t broadcast over channel dim 1."""
        if self.threshold is None:
            return x
        return x - self.threshold.reshape(1, -1, *([1] * (x.dim() - 2)))

    def sign(self, x: torch.Tensor) -> torch.Tensor:
        """``binarize(x)`` with this activation's gradient (no threshold)."""
        return SIGN_GRADIENTS[self.gradient].apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign(self.shifted(x))


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al. 2020): ``f(x) = PReLU_beta(x - gamma) + zeta`` per channel,
    ``x - gamma + zeta`` above gamma and ``beta (x - gamma) + zeta`` below, with learnable
    gamma, zeta (starting at 0) and slope beta (starting at PReLU's 0.25)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.full((channels,), 0.25))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return F.prelu(x - self.gamma.reshape(shape), self.beta) + self.zeta.reshape(shape)


class XNORConv2d(QuantConv2d):
    """XNOR-Net convolution: ``(conv(sign(I), sign(W)) * alpha) * K(I) + b``, K the box-filtered
    channel mean of |I| (one beta per output position) computed from the real input.

    alpha is factored out of the convolution (the paper's ``(sign(I) * sign(W)) . K alpha``):
    the +-1 convolution sums integers, exact in float32 in any order, and the three factors are
    then applied in the order the deployed popcount kernel uses, so the deployed layer gives
    this layer's outputs bit for bit. The gradients are those of ``conv(sign(I), alpha sign(W))``.
    With ``input_scale`` False there is no K: ``conv(sign(I), sign(W)) * alpha + b``, the binary
    convolution of Bi-Real Net and ReActNet (Liu et al. 2018, 2020).
    """

    input_scale = True

    def binary_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha [O, 1, 1, 1], sign(W)) of the weight, with their gradients."""
        if isinstance(self.weight_quantizer, nn.Identity):
            # rebuilt from a packed file, the weight is the decoded alpha sign(W): |W| = alpha
            w = self.weight
            return w.abs().amax(dim=(1, 2, 3), keepdim=True), binarize(w)
        return self.weight_quantizer.factors(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer.shifted(x)  # RSign's threshold: K is that of the shifted input
        alpha, signs = self.binary_factors()
        dot = self._conv_forward(self.input_quantizer.sign(x), signs, None)
        out = dot * alpha.reshape(1, -1, 1, 1)
        if self.input_scale:
            out = out * xnor_input_scale(x.detach(), self.kernel_size, self.stride, self.padding,
                                         self.dilation)
        return out if self.bias is None else out + self.bias.reshape(1, -1, 1, 1)
