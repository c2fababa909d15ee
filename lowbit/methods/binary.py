"""Binary and ternary networks as training methods (fine-tuned by the engine).

``kind``:

* ``bc`` / ``bc-stochastic``: BinaryConnect (Courbariaux et al. 2015), binary weights, float
  inputs; latent weights clipped to [-1, 1] after every update.
* ``bnn``: binary weights and inputs (Hubara et al. 2016), clipped latent weights.
* ``bwn``: alpha sign(W) per filter, float inputs (Rastegari et al. 2016).
* ``xnor``: BWN weights, binary inputs and the K map (Rastegari et al. 2016).
* ``twn``: ternary weights (Li et al. 2016). ``ttq``: trained ternary (Zhu et al. 2017).

Binary inputs need signed values: for ``bnn`` and ``xnor`` every ReLU is removed (the block
becomes BN -> sign -> binary conv, XNOR-Net's order; see :mod:`lowbit.transforms.activations`).
The first and last layers follow the shared policy: at ``first_last_bits`` (8) with STE fake
quantization of weights (per-channel min-max) and inputs (EMA), or binary too when None. With
binary inputs, grouped and depthwise convs (MobileNet, ShuffleNet, EfficientNet) stay at that
precision too, with a warning naming them (see :meth:`BinaryMethod._keep_grouped`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.errors import ConfigError
from lowbit.methods.base import TrainingMethod
from lowbit.nn.binary import (BinaryWeight, ScaledBinaryWeight, SignActivation, TernaryWeight,
                              TTQWeight, XNORConv2d)
from lowbit.nn.layers import WRAPPERS
from lowbit.nn.observed import ObservedQuantizer
from lowbit.policy import LayerBits, LayerPolicy
from lowbit.quant.affine import QScheme, check_bits
from lowbit.transforms import layer_order, remove_relus, swap_layers

KINDS = ("bc", "bc-stochastic", "bnn", "bwn", "xnor", "twn", "ttq")
BINARY_INPUTS = ("bnn", "xnor")
CLIPPED = ("bc", "bc-stochastic", "bnn")


@dataclass
class BinaryConfig(ConfigMixin):
    label = "binary"

    kind: str = "bwn"
    first_last_bits: int | None = 8
    ttq_threshold: float = 0.05
    skip: list[str] = field(default_factory=list)

    def validate(self) -> "BinaryConfig":
        if self.kind not in KINDS:
            raise ConfigError(f"binary kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
            if self.first_last_bits < 2:
                raise ConfigError("first_last_bits must be >= 2 (or null for binary)")
        if not 0 < self.ttq_threshold < 1:
            raise ConfigError(f"ttq_threshold must be in (0, 1), got {self.ttq_threshold}")
        return self


class BinaryMethod(TrainingMethod):
    def __init__(self, config: BinaryConfig):
        self.config = config.validate()
        self.name = config.kind
        self.clipped: list[nn.Parameter] = []

    def _binary_weight(self) -> nn.Module:
        kind = self.config.kind
        if kind in ("bc", "bc-stochastic", "bnn"):
            return BinaryWeight(stochastic=kind == "bc-stochastic")
        if kind in ("bwn", "xnor"):
            return ScaledBinaryWeight()
        return TernaryWeight() if kind == "twn" else TTQWeight(self.config.ttq_threshold)

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        c = self.config
        self.clipped = []
        if c.kind in BINARY_INPUTS:
            model, _ = remove_relus(model)
        order = layer_order(model, example)
        # w_bits 1 marks the binary layers; first / last keep first_last_bits
        self.plan = LayerPolicy(c.first_last_bits, list(c.skip)).resolve(order, 1, 1)
        if c.kind in BINARY_INPUTS:
            self._keep_grouped(model)

        def wrap(name, layer):
            bits = self.plan.get(name)
            if bits is None:
                return None
            if bits.w_bits > 1:  # the higher-precision first / last layer
                weights = ObservedQuantizer(QScheme(bits.w_bits, signed=True, symmetric=True,
                                                    narrow=True), axis=0, name=f"{name}.weight")
                inputs = ObservedQuantizer(QScheme(bits.w_bits), name=f"{name}.input",
                                           observer="ema")
                return WRAPPERS[type(layer)].from_float(layer, weights, inputs)
            inputs = SignActivation() if c.kind in BINARY_INPUTS else None
            cls = XNORConv2d if c.kind == "xnor" and isinstance(layer, nn.Conv2d) else \
                WRAPPERS[type(layer)]
            if c.kind in CLIPPED:
                self.clipped.append(layer.weight)
            return cls.from_float(layer, self._binary_weight(), inputs)
        return swap_layers(model, wrap)

    def _keep_grouped(self, model: nn.Module) -> None:
        """Grouped and depthwise convs keep ``first_last_bits`` (8 if None) where inputs are
        binary: a depthwise filter sums 9 products of signs (its output takes 10 values), which
        no later layer recovers from, and the XNOR-popcount kernel takes groups 1 only."""
        bits = self.config.first_last_bits or 8
        kept = [name for name, bits_of in self.plan.items() if bits_of.w_bits == 1
                and getattr(model.get_submodule(name), "groups", 1) > 1]
        for name in kept:
            self.plan[name] = LayerBits(bits, bits)
        if kept:
            warnings.warn(f"{self.config.kind}: {len(kept)} grouped / depthwise convs kept at "
                          f"{bits} bits, not binary ({', '.join(kept[:3])}"
                          f"{', ...' if len(kept) > 3 else ''})", stacklevel=3)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """BinaryConnect / BNN: clip the latent weights to [-1, 1]."""
        for w in self.clipped:
            w.clamp_(-1.0, 1.0)
