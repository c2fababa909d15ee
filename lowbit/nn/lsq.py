"""The LSQ quantizer module (Esser et al. 2020): a learnable step per tensor or per channel.

* The step is a parameter, initialised on the first tensor the quantizer sees to
  s_0 = 2 mean|v| / sqrt(Q_P) (weights: the pretrained weights; activations: the first batch),
  or with ``init="mse"`` to the step of least quantization MSE (:func:`lsq_mse_step`).
* Signedness: weights are signed; an input is unsigned when the first batch is non-negative
  (after a ReLU) and signed otherwise. The network's normalized image is signed, so the first
  layer's input gets Q_N = 2^(b-1), Q_P = 2^(b-1) - 1 (lsq-net leaves it unquantized instead).
* Gradient scale g = 1 / sqrt(N Q_P), N = the number of elements that share one step *in one
  example*: all weights of the tensor (per-tensor) or of the channel (per-channel); for
  activations the features of one example, i.e. numel / batch. This is the paper's N_F.
  PyTorch's ``_LearnableFakeQuantize`` and lsq-net count the whole batch instead, which makes
  the step's effective learning rate sqrt(batch) times smaller.
* A step driven to <= 0 or NaN by training is reset to a positive floor (1e-4 of its initial
  value) with a warning, after the optimizer step that did it (:meth:`keep_step_positive`, run
  by the QAT method): the forward never divides by zero.
* The forward has no data-dependent branch once initialised (the sign is mirrored in a Python
  attribute), so ``torch.compile`` captures a quantized network as one graph; initialisation
  happens in eager mode, on the calibration pass before any compiled step.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lowbit.quant.affine import broadcast_along
from lowbit.quant.lsq import (LSQFakeQuantize, lsq_bounds, lsq_grad_scale, lsq_initial_step,
                              lsq_mse_step)

INITS = ("paper", "mse")

FLOOR = 1e-4


class LSQQuantizer(nn.Module):
    def __init__(self, bits: int, signed: bool | None, channels: int | None = None,
                 axis: int = 0, is_weight: bool = True, name: str = "", init: str = "paper"):
        """``signed=None`` decides from the first tensor; ``channels`` gives a per-channel step
        along ``axis``; ``is_weight=False`` counts N per example (activations); ``init`` is
        "paper" or "mse"."""
        super().__init__()
        self.bits, self.axis, self.name = bits, axis if channels else None, name
        self.init = init
        self.is_weight = is_weight
        self.step = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._signed = bool(signed)  # mirrors the buffer: Q_N, Q_P without reading a tensor
        self.register_buffer("fixed_sign", torch.tensor(signed is not None))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("floor", torch.zeros_like(self.step.detach()))

    @property
    def bounds(self) -> tuple[int, int]:
        return lsq_bounds(self.bits, self._signed)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._signed = bool(self.signed)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        if not self.fixed_sign:
            self.signed.fill_(bool((x < 0).any()))
            self._signed = bool(self.signed)
        q_n, q_p = self.bounds
        step = lsq_mse_step(x, q_n, q_p, self.axis) if self.init == "mse" else \
            lsq_initial_step(x, q_p, self.axis)
        step = step.clamp(min=1e-8)
        self.step.copy_(step.reshape(self.step.shape))
        self.floor.copy_(FLOOR * self.step)
        self.initialized.fill_(True)

    @torch.no_grad()
    def keep_step_positive(self) -> None:
        bad = ~(self.step > self.floor)  # also catches NaN
        if bad.any():
            warnings.warn(f"LSQ step of {self.name or 'a quantizer'} reached "
                          f"{self.step[bad].flatten()[0].item():.3g}; reset to its floor "
                          "(lower the learning rate)", stacklevel=3)
            self.step.copy_(torch.where(bad, self.floor, self.step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and not self.initialized:
            self.initialize(x)
        q_n, q_p = self.bounds
        n = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
        if not self.is_weight:
            n //= x.shape[0]
        step = broadcast_along(self.step, x, self.axis)
        return LSQFakeQuantize.apply(x, step, q_n, q_p, lsq_grad_scale(n, q_p))

    def storage_bits(self, weight: torch.Tensor) -> int:
        """b bits per weight and a float32 step per tensor (or channel)."""
        return self.bits * weight.numel() + 32 * self.step.numel()

    def extra_repr(self) -> str:
        per = "per-channel" if self.axis is not None else "per-tensor"
        return f"bits={self.bits}, {per}, signed={bool(self.signed)}"
