"""Stateful quantizers: qparams in buffers so ``state_dict``, checkpoints and DDP just work."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import CalibrationError
from lowbit.quant.affine import QScheme, affine_qparams, fake_quantize, integer_range, quantize

_STATE = ("scale", "zero_point", "quant_min", "quant_max")


class LazyBuffers:
    """Mixin for modules whose buffers are sized when first calibrated (they start empty):
    loading a state_dict adopts the saved shapes, so a checkpoint loads into a fresh model."""

    lazy_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in self.lazy_buffers:
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class AffineQuantizer(LazyBuffers, nn.Module):
    """Fake-quantizes a tensor with per-tensor or per-channel affine qparams.

    The scheme (bits, signed, symmetric, narrow) and ``axis`` are fixed at construction; the range
    is set later by :meth:`set_range` (a calibration step, an observer, a method). Per-channel
    bits (bit allocation) are passed to :meth:`set_range` and stored as per-channel
    ``quant_min`` / ``quant_max``. A quantizer used before it has a range raises
    :class:`CalibrationError` naming its layer.
    """

    lazy_buffers = _STATE

    def __init__(self, scheme: QScheme, axis: int | None = None, name: str = ""):
        super().__init__()
        self.scheme, self.axis, self.name = scheme, axis, name
        for key in _STATE:
            self.register_buffer(key, torch.empty(0))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def bits(self) -> torch.Tensor:
        """Bits per channel (or a scalar) derived from the stored integer range."""
        return torch.log2(self.quant_max - self.quant_min + 1).round().to(torch.int64)

    def set_range(self, lo, hi, bits=None, signed: bool | None = None) -> None:
        """Compute and store qparams covering [lo, hi].

        ``bits`` overrides the scheme's width (an int or a per-channel tensor); ``signed``
        overrides its signedness (activations decide it from calibration data), as a bool or
        as a boolean tensor (the grid is then chosen on the device).
        """
        scheme = self.scheme
        bits = torch.as_tensor(scheme.bits if bits is None else bits)
        signed = scheme.signed if signed is None else signed
        if isinstance(signed, torch.Tensor):  # decided on the device: no host read
            (s_min, s_max), (u_min, u_max) = (integer_range(bits, True, scheme.narrow),
                                              integer_range(bits, False, scheme.narrow))
            qmin, qmax = torch.where(signed, s_min, u_min), torch.where(signed, s_max, u_max)
            grid_signed = None
        else:
            qmin, qmax = integer_range(bits, signed, scheme.narrow)
            grid_signed = signed
        qmin = torch.as_tensor(qmin, dtype=torch.float32)
        qmax = torch.as_tensor(qmax, dtype=torch.float32)
        scale, zero_point = affine_qparams(lo, hi, qmin, qmax, scheme.symmetric, grid_signed)
        shape, device = scale.shape, self.scale.device  # the qparams stay where the module is
        self.scale = scale.detach().float().to(device)
        self.zero_point = zero_point.detach().float().to(device)
        self.quant_min = (qmin.expand(shape).clone() if shape else qmin).to(device)
        self.quant_max = (qmax.expand(shape).clone() if shape else qmax).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise CalibrationError(f"quantizer {self.name or '(unnamed)'} was never calibrated: "
                                   "run lowbit.quantize (or load a quantized checkpoint) first")
        return fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                             self.axis if self.scale.dim() else None)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(x / S) + Z, q_min, q_max)`` of ``x`` (a float tensor),
        exactly those the fake quantization rounds ``x`` to."""
        return quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max,
                        self.axis if self.scale.dim() else None)

    def storage_bits(self, weight: torch.Tensor) -> int:
        """Bits to store ``weight`` quantized: its codes (per-channel widths included) plus a
        float32 scale and a 32-bit zero point per channel."""
        if not self.calibrated:
            return 32 * weight.numel()
        bits = self.bits
        if bits.dim():
            total = int(bits.sum()) * (weight.numel() // weight.shape[self.axis])
        else:
            total = int(bits) * weight.numel()
        return total + 64 * self.scale.numel()

    def extra_repr(self) -> str:
        s = self.scheme
        kind = "symmetric" if s.symmetric else "asymmetric"
        return f"bits={s.bits}, {kind}, axis={self.axis}, calibrated={self.calibrated}"


class CorrectedQuantizer(LazyBuffers, nn.Module):
    """A weight quantizer followed by a per-output-channel affine correction
    ``W_q' = gain * Q(W) + shift`` (Banner et al. 2019 bias correction, see
    :func:`lowbit.quant.correct_weight_bias`)."""

    lazy_buffers = ("gain", "shift")

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("gain", torch.empty(0))
        self.register_buffer("shift", torch.empty(0))

    def set_correction(self, gain: torch.Tensor, shift: torch.Tensor) -> None:
        self.gain, self.shift = gain.detach().float(), shift.detach().float()

    def storage_bits(self, weight: torch.Tensor) -> int:
        return self.quantizer.storage_bits(weight) + 32 * (self.gain.numel() + self.shift.numel())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w_q = self.quantizer(w)
        if self.gain.numel() == 0:
            return w_q
        shape = (-1,) + (1,) * (w.dim() - 1)
        return w_q * self.gain.reshape(shape) + self.shift.reshape(shape)


def affine_part(slot: nn.Module) -> AffineQuantizer | None:
    """The affine quantizer of a weight slot (inside a bias correction), or None."""
    q = slot.quantizer if isinstance(slot, CorrectedQuantizer) else slot
    return q if isinstance(q, AffineQuantizer) else None
