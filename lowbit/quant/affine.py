"""Uniform affine quantization (GEMMLOWP; Jacob et al. 2018; MIT efficient-ML lecture 5).

Real value r, integer q, scale S > 0, zero point Z::

    q = clamp(round(r / S) + Z, q_min, q_max)        r_hat = S * (q - Z)

Conventions, fixed once for the whole package:

* ``round`` is ``torch.round`` (half to even), and ``r / S`` is computed as ``r * (1 / S)`` exactly
  as PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` kernels do, so lowbit's fake-quant
  is bit-identical to PyTorch's on the same qparams.
* Every range is widened to contain 0 before the qparams are computed, so real 0 is exactly
  representable (GEMMLOWP "true zero"; needed for zero padding and ReLU zeros).
* An all-zero range gets scale 1 (never a division by zero) and is reproduced exactly.
* Per-channel parameters are 1-D tensors applied along ``axis``; ``q_min`` / ``q_max`` may be
  per-channel too, which is how per-channel bit allocation (Banner et al. 2019) is expressed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import ConfigError

MIN_BITS, MAX_BITS = 1, 16


@dataclass(frozen=True)
class QScheme:
    """How a tensor is mapped to integers.

    bits: 1..16. signed: integer range centred on 0 (else [0, 2^b - 1]).
    symmetric: Z = 0 and S = max|r| / q_max (else asymmetric with a nudged zero point).
    narrow: the restricted signed range [-(2^(b-1) - 1), 2^(b-1) - 1] (TFLite / PSG weights);
    otherwise the full range [-2^(b-1), 2^(b-1) - 1] (PyTorch qint8, LSQ).
    """

    bits: int
    signed: bool = False
    symmetric: bool = False
    narrow: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.symmetric and self.signed and integer_range(self.bits, True, self.narrow)[1] < 1:
            raise ConfigError(f"a symmetric signed {self.bits}-bit scheme has no positive level; "
                              "use at least 2 bits or an asymmetric scheme")

    @property
    def range(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed, self.narrow)


def check_bits(bits, what: str = "bits") -> None:
    """Raise ConfigError unless ``bits`` is an integer in 1..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def integer_range(bits, signed: bool, narrow: bool = False):
    """(q_min, q_max) for ``bits`` (an int, or an integer tensor for per-channel bits).

    unsigned: [0, 2^b - 1]; signed full: [-2^(b-1), 2^(b-1) - 1];
    signed narrow (restricted): [-(2^(b-1) - 1), 2^(b-1) - 1].
    """
    if signed:
        half = 2 ** (bits - 1)
        return (-half + 1 if narrow else -half), half - 1
    return 0 * bits, 2 ** bits - 1


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin, qmax, symmetric: bool,
                   signed: bool | None = None):
    """Scale and zero point mapping the range [lo, hi] (widened to contain 0) onto [qmin, qmax].

    asymmetric (GEMMLOWP): S = (hi - lo) / (q_max - q_min), Z = clamp(round(q_min - lo / S)).
    symmetric: Z = 0, S = max(|lo|, hi) / q_max (signed) or hi / q_max (unsigned, lo >= 0 assumed:
    negatives clip to 0).
    ``signed`` (symmetric only) says whether the grid is signed; by default it is read from
    ``qmin`` (a host read that ``torch.compile`` cannot trace through).
    Returns float tensors (Z holds integers).
    """
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    qmin = torch.as_tensor(qmin, dtype=torch.float32)
    qmax = torch.as_tensor(qmax, dtype=torch.float32)
    if symmetric:
        signed = bool((qmin < 0).all()) if signed is None else signed
        span = torch.maximum(-lo, hi) if signed else hi
        scale = span / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(qmin - lo / safe), qmin, qmax)
    # An empty range gets S = 1; a denormal one is floored at the smallest normal float so 1/S
    # stays finite (0 * inf would be NaN).
    scale = torch.where(scale > 0, scale.clamp(min=torch.finfo(torch.float32).tiny),
                        torch.ones_like(scale))
    return scale, zero_point


def broadcast_along(t, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of ``x`` (scalars pass)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x, scale, zero_point, qmin, qmax, axis: int | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(x * (1/S)) + Z, q_min, q_max)`` (as a float tensor)."""
    inv = 1.0 / broadcast_along(scale, x, axis)
    z = broadcast_along(zero_point, x, axis)
    return torch.clamp(torch.round(x * inv) + z, broadcast_along(qmin, x, axis), broadcast_along(qmax, x, axis))


def dequantize(q, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """Real values ``S * (q - Z)``."""
    return (q - broadcast_along(zero_point, q, axis)) * broadcast_along(scale, q, axis)


class FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization with the clipped straight-through estimator (Bengio et al. 2013).

    forward:  y = S * (clamp(round(x/S) + Z, q_min, q_max) - Z)
    backward: dL/dx = dL/dy * 1[q_min <= round(x/S) + Z <= q_max]

    The mask is decided on the *rounded* value, as PyTorch's ``fake_quantize_per_*_affine`` do,
    so gradients match them exactly. No gradient flows to the qparams (see LSQ for that).
    All qparam tensors arrive already shaped to broadcast against ``x``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        # clamp(round(x/S) + Z, qmin, qmax) - Z == clamp(round(x/S), qmin - Z, qmax - Z) exactly
        # (small integers in float32), which saves two full passes over x; in place for speed.
        lo, hi = qmin - zero_point, qmax - zero_point
        if lo.dim() == 0 and hi.dim() == 0 and lo.device.type == "cpu" and \
                not torch.compiler.is_compiling():  # a compiled graph keeps them as tensors
            lo, hi = lo.item(), hi.item()  # per-tensor: scalar bounds take a faster eager kernel
        v = torch.mul(x, 1.0 / scale).round_()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((v >= lo) & (v <= hi))
        return v.clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x, scale, zero_point, qmin, qmax, axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` in float, differentiable through :class:`FakeQuantizeSTE`."""
    return FakeQuantizeSTE.apply(x, broadcast_along(scale, x, axis), broadcast_along(zero_point, x, axis),
                                 broadcast_along(qmin, x, axis), broadcast_along(qmax, x, axis))
