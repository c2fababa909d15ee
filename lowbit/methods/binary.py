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

The modern binary recipe, as options of ``bnn`` / ``xnor`` (ALGORITHMS.md 8.2):

* ``shortcuts: bireal``: a real-valued shortcut around every binary convolution (Bi-Real Net,
  Liu et al. 2018; :mod:`lowbit.transforms.bireal`, whose weight-free real shortcuts supersede
  the network's own), the BatchNorm after each binary conv kept; 1x1 strided (downsampling)
  convs outside a residual sum are kept at ``first_last_bits``.
* ``learnable_threshold``: ReActNet's RSign, ``sign(x - t_c)`` with a learnable threshold per
  input channel; ``rprelu``: ReActNet's RPReLU after each real-valued shortcut (Liu et al. 2020).
* ``sign_gradient: approx``: Bi-Real's ApproxSign gradient instead of the hardtanh STE.
* ``input_scale: false`` (``xnor``): no K, the activation scale of XNOR-Net, which Bi-Real Net
  and ReActNet drop; deployed, such a convolution whose output only feeds binary convolutions
  writes its signs from an integer threshold per channel (:mod:`lowbit.deploy.xnor`).
* ``binary_weights_from_epoch: E``: two stages in one run (Martinez et al. 2020, real-to-binary):
  binary activations with real weights for the first E epochs, then binary weights too. Give
  the training a cosine schedule restarting at E (``milestones: [E]``) for a fresh schedule per
  stage, and ``distill`` for the float model as teacher.
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
from lowbit.quant.binary import SIGN_GRADIENTS
from lowbit.nn.layers import WRAPPERS
from lowbit.nn.observed import ObservedQuantizer
from lowbit.policy import LayerBits, LayerPolicy
from lowbit.quant.affine import QScheme, check_bits
from lowbit.transforms import layer_order, remove_relus, swap_layers
from lowbit.transforms.bireal import add_real_shortcuts

KINDS = ("bc", "bc-stochastic", "bnn", "bwn", "xnor", "twn", "ttq")
BINARY_INPUTS = ("bnn", "xnor")
CLIPPED = ("bc", "bc-stochastic", "bnn")
SHORTCUTS = ("none", "bireal")


@dataclass
class BinaryConfig(ConfigMixin):
    label = "binary"

    kind: str = "bwn"
    first_last_bits: int | None = 8
    ttq_threshold: float = 0.05
    skip: list[str] = field(default_factory=list)
    shortcuts: str = "none"
    learnable_threshold: bool = False
    rprelu: bool = False
    sign_gradient: str = "ste"
    binary_weights_from_epoch: int = 0
    input_scale: bool = True

    def validate(self) -> "BinaryConfig":
        if self.kind not in KINDS:
            raise ConfigError(f"binary kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.shortcuts not in SHORTCUTS:
            raise ConfigError(f"shortcuts must be one of {', '.join(SHORTCUTS)}, "
                              f"got {self.shortcuts!r}")
        if self.sign_gradient not in SIGN_GRADIENTS:
            raise ConfigError(f"sign_gradient must be one of {', '.join(SIGN_GRADIENTS)}, "
                              f"got {self.sign_gradient!r}")
        e = self.binary_weights_from_epoch
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ConfigError(f"binary_weights_from_epoch must be an integer >= 0, got {e!r}")
        recipe = {"shortcuts": self.shortcuts != "none", "rprelu": self.rprelu,
                  "learnable_threshold": self.learnable_threshold,
                  "sign_gradient": self.sign_gradient != "ste", "binary_weights_from_epoch": e > 0}
        used = [name for name, on in recipe.items() if on]
        if used and self.kind not in BINARY_INPUTS:
            raise ConfigError(f"{', '.join(used)} apply to binary activations (bnn, xnor), "
                              f"not {self.kind}")
        if not self.input_scale and self.kind != "xnor":
            raise ConfigError(f"input_scale (XNOR-Net's K) applies to xnor, not {self.kind}")
        if self.rprelu and self.shortcuts == "none":
            raise ConfigError("rprelu follows the real-valued shortcuts: set shortcuts: bireal")
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
        self.binary_weights: list[nn.Module] = []

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
        if c.first_last_bits is None:
            warnings.warn(f"{c.kind}: the first and last layers are binary too (first_last_bits: "
                          f"null); binary networks keep them at higher precision because "
                          f"binarizing them costs accuracy", stacklevel=2)
        if c.kind in BINARY_INPUTS:
            self._keep_grouped(model)
        if c.shortcuts == "bireal":
            self._keep_downsampling(model)
            binary = [name for name, bits in self.plan.items() if bits.w_bits == 1
                      and isinstance(model.get_submodule(name), nn.Conv2d)]
            model, missed = add_real_shortcuts(model, binary, example, rprelu=c.rprelu)
            present = dict(model.named_modules())  # superseded downsampling convs are gone
            self.plan = {n: b for n, b in self.plan.items() if n in present}
            if missed:
                warnings.warn(f"{c.kind}: {len(missed)} binary convs have no real-valued "
                              f"shortcut (no BatchNorm after them, or a shape no weight-free "
                              f"shortcut reaches: {', '.join(missed[:3])}"
                              f"{', ...' if len(missed) > 3 else ''})", stacklevel=2)
        self.binary_weights = []

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
            inputs = None
            if c.kind in BINARY_INPUTS:
                channels = layer.weight.shape[1] if c.learnable_threshold else 0
                inputs = SignActivation(channels, c.sign_gradient)
            cls = XNORConv2d if c.kind == "xnor" and isinstance(layer, nn.Conv2d) else \
                WRAPPERS[type(layer)]
            if c.kind in CLIPPED:
                self.clipped.append(layer.weight)
            weights = self._binary_weight()
            self.binary_weights.append(weights)
            wrapped = cls.from_float(layer, weights, inputs)
            if cls is XNORConv2d:
                wrapped.input_scale = c.input_scale
            return wrapped
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

    def _keep_downsampling(self, model: nn.Module) -> None:
        """Bi-Real keeps the downsampling shortcut real: 1x1 strided convs at the kept width."""
        bits = self.config.first_last_bits or 8
        for name, bits_of in self.plan.items():
            layer = model.get_submodule(name)
            if bits_of.w_bits == 1 and isinstance(layer, nn.Conv2d) \
                    and layer.kernel_size == (1, 1) and max(layer.stride) > 1:
                self.plan[name] = LayerBits(bits, bits)

    def before_step(self, model: nn.Module, epoch: int, step: int) -> None:
        """Two stages: real weights before ``binary_weights_from_epoch``, binary from it on."""
        binary = epoch >= self.config.binary_weights_from_epoch
        for quantizer in self.binary_weights:
            quantizer.enabled = binary

    def finalize(self, model: nn.Module) -> nn.Module:
        """The saved and deployed network has binary weights whatever the stage it stopped in."""
        for quantizer in self.binary_weights:
            quantizer.enabled = True
        return model

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """BinaryConnect / BNN: clip the latent weights to [-1, 1]."""
        for w in self.clipped:
            w.clamp_(-1.0, 1.0)
