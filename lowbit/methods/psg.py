"""PSG / PSGD training (Kim, Yoo, Kwak, NeurIPS 2020) as a method of the training engine.

Every quantized layer's weight slot holds a :class:`PSGGradientScaler`, so the scaling works
with any torch optimizer (SGD, Adam, ...): it acts on the gradient before the optimizer sees it,
and the optimizer's weight decay is added afterwards, unscaled, as in the reference. The model
trains and stays in full precision; :func:`unwrap` returns the plain float model, which is then
quantized by PTQ on the same grid (symmetric, restricted range, per tensor: :func:`ptq_config`).

Layer policy as in the reference (``first_last_quant=1``): the first conv and the last linear
get PSG too, at ``fl_bits = 8 if w_bits < 4 else w_bits``, and the last layer's bias gets its
own scaling (exact range). ``first_last=False`` leaves them plain float layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.errors import ConfigError
from lowbit.methods.base import TrainingMethod
from lowbit.methods.ptq import PTQConfig
from lowbit.nn.layers import QUANT_LAYERS, WRAPPERS
from lowbit.nn.psg import PSGGradientScaler
from lowbit.policy import LayerPolicy
from lowbit.quant.psg import check_psg_bits, psg_grid_step, psg_quantize
from lowbit.transforms import layer_order, swap_layers


@dataclass
class PSGConfig(ConfigMixin):
    label = "PSG"

    w_bits: int = 4
    lambda_s: float = 150.0
    per_channel: bool = False
    ema_momentum: float | None = None
    sparse: bool = False
    first_last: bool = True
    skip: list[str] = field(default_factory=list)

    @property
    def first_last_bits(self) -> int:
        return 8 if self.w_bits < 4 else self.w_bits

    def validate(self) -> "PSGConfig":
        if not self.sparse:
            check_psg_bits(self.w_bits)
        if not self.lambda_s > 0:
            raise ConfigError(f"lambda_s must be positive, got {self.lambda_s}")
        if self.ema_momentum is not None and not 0 < self.ema_momentum <= 1:
            raise ConfigError(f"ema_momentum must be in (0, 1], got {self.ema_momentum}")
        return self

    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.first_last_bits, list(self.skip))


class PSGMethod(TrainingMethod):
    name = "psg"

    def __init__(self, config: PSGConfig):
        self.config = config.validate()
        self._hooks = []

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        c = self.config
        order = layer_order(model, example)
        plan = c.policy().resolve(order, c.w_bits, None)
        if not c.first_last:
            plan = {k: v for k, v in plan.items() if k not in (order[0], order[-1])}
        self.plan = plan

        def wrap(name, layer):
            if name not in plan:
                return None
            scaler = PSGGradientScaler(plan[name].w_bits, c.lambda_s, c.per_channel,
                                       c.ema_momentum, c.sparse, name=name)
            return WRAPPERS[type(layer)].from_float(layer, scaler)
        model = swap_layers(model, wrap)
        last = model.get_submodule(order[-1])
        if order[-1] in plan and last.bias is not None:
            bits, lam, sparse = plan[order[-1]].w_bits, c.lambda_s, c.sparse

            def scale_bias(grad, bias=last.bias):
                with torch.no_grad():
                    b = bias.detach()
                    target = 0 if sparse else psg_quantize(
                        b, psg_grid_step(b.min(), b.max(), bits), bits)
                    return grad * (lam * (b - target).abs())
            self._hooks.append(last.bias.register_hook(scale_bias))
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """The plain float model (wrappers replaced by the float layers, bias hook removed)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        return unwrap(model)


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every quantized wrapper by its float layer (same parameters, no slots)."""
    floats = {v: k for k, v in WRAPPERS.items()}
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QUANT_LAYERS):
            plain = floats[type(layer)].__new__(floats[type(layer)])
            plain.__dict__ = layer.__dict__.copy()
            plain._modules = {}  # the slots
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, plain)
    return model


@torch.no_grad()
def sparsity(model: nn.Module, threshold: float) -> float:
    """Fraction of Conv / Linear weights with |w| <= ``threshold`` (PSG's sparse training)."""
    small = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            small += (m.weight.abs() <= threshold).sum().item()
            total += m.weight.numel()
    return small / max(total, 1)


def ptq_config(config: PSGConfig, a_bits: int | None = None, **overrides) -> PTQConfig:
    """The PTQ that evaluates a PSG-trained model on the grid it was trained for: symmetric,
    restricted range, per tensor (per channel if trained so), min-max, BN not folded (folding
    would move the weights off the grid), first / last layer at ``fl_bits`` (also when they
    were trained without PSG: 8-bit weights cost nothing measurable)."""
    return PTQConfig(w_bits=config.w_bits, a_bits=a_bits, w_symmetric=True,
                     w_per_channel=config.per_channel, fold_bn=False,
                     first_last_bits=config.first_last_bits, **overrides)
