"""Quantized layer wrappers: each has a ``weight_quantizer`` and an ``input_quantizer`` slot.

A wrapper never knows which method filled its slots: any ``nn.Module`` mapping a tensor to a
tensor fits (``nn.Identity`` when a slot is unused). Subclassing the float layer keeps its
``weight`` / ``bias`` parameters at the same state_dict keys.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _QuantSlots:
    def _init_slots(self, weight_quantizer: nn.Module | None, input_quantizer: nn.Module | None):
        self.weight_quantizer = weight_quantizer or nn.Identity()
        self.input_quantizer = input_quantizer or nn.Identity()

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(self.input_quantizer(x), self.quantized_weight())

    @classmethod
    def from_float(cls, layer, weight_quantizer=None, input_quantizer=None, with_bias=False):
        """Wrap ``layer`` (sharing its parameters); ``with_bias`` adds a zero bias if it has none."""
        new = cls.__new__(cls)
        new.__dict__ = layer.__dict__.copy()
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
        if with_bias and new.bias is None:
            out = layer.weight.shape[0]
            new.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype,
                                                device=layer.weight.device))
        new._init_slots(weight_quantizer, input_quantizer)
        return new


class QuantConv2d(_QuantSlots, nn.Conv2d):
    """``nn.Conv2d`` computing ``conv(input_quantizer(x), weight_quantizer(W)) + b``."""

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float convolution with a given weight (no quantizer): ``conv(x, weight) + b``."""
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(_QuantSlots, nn.Linear):
    """``nn.Linear`` computing ``input_quantizer(x) @ weight_quantizer(W).T + b``."""

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float affine map with a given weight (no quantizer): ``x @ weight.T + b``."""
        return F.linear(x, weight, self.bias)


WRAPPERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
QUANT_LAYERS = (QuantConv2d, QuantLinear)
