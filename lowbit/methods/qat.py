"""Quantization-aware training: fake quantization in the forward pass, trained by the engine.

Two quantizers fill the wrapper slots:

* ``quantizer="ste"`` (Jacob et al. 2018; Krishnamoorthi 2018): weights per-channel symmetric
  (restricted range) from the exact min / max of the current weights, inputs asymmetric from an
  EMA of the batch min / max (momentum 0.01, PyTorch's default); clipped straight-through
  estimator. Activation quantization can start after ``act_quant_delay`` steps and BN
  statistics can be frozen from ``freeze_bn_epoch`` (Jacob et al.'s schedule).
* ``quantizer="lsq"`` (Esser et al. 2020): learned step sizes, per tensor as in the paper (per
  channel with ``w_per_channel``), started at the paper's 2 mean|v| / sqrt(Q_P) or, with
  ``lsq_init="mse"``, at the step of least quantization error; see :mod:`lowbit.nn.lsq`.

BN stays a separate layer during training. With symmetric per-channel weights folding it
afterwards is exact: the folded channel keeps its integer codes and its scale is multiplied by
|gamma / sigma|. First and last layers follow the shared layer policy (8 bits by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.errors import ConfigError
from lowbit.methods.base import TrainingMethod
from lowbit.nn.accumulator import round_biases
from lowbit.nn.layers import WRAPPERS
from lowbit.nn.lsq import INITS as LSQ_INITS
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.observed import ObservedQuantizer
from lowbit.policy import LayerPolicy
from lowbit.quant.affine import QScheme, check_bits
from lowbit.transforms import layer_order, swap_layers

QUANTIZERS = ("ste", "lsq")


@dataclass
class QATConfig(ConfigMixin):
    label = "QAT"

    quantizer: str = "ste"
    w_bits: int = 4
    a_bits: int | None = 4
    w_per_channel: bool = True
    lsq_init: str = "paper"
    act_momentum: float = 0.01
    act_quant_delay: int = 0
    freeze_bn_epoch: int | None = None
    first_last_bits: int | None = 8
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)

    def validate(self) -> "QATConfig":
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {', '.join(QUANTIZERS)}, "
                              f"got {self.quantizer!r}")
        if self.lsq_init not in LSQ_INITS:
            raise ConfigError(f"lsq_init must be one of {', '.join(LSQ_INITS)}, "
                              f"got {self.lsq_init!r}")
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.w_bits < 2:
            raise ConfigError(f"{self.quantizer} needs w_bits >= 2 (a symmetric 1-bit grid has "
                              "no positive level); use a binary method for 1 bit")
        if not 0 < self.act_momentum <= 1:
            raise ConfigError(f"act_momentum must be in (0, 1], got {self.act_momentum}")
        if self.act_quant_delay < 0:
            raise ConfigError(f"act_quant_delay must be >= 0, got {self.act_quant_delay}")
        self.policy().validate()
        return self

    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.first_last_bits, list(self.skip), dict(self.overrides))


class QATMethod(TrainingMethod):
    """The training method the engine calls: wraps layers, then schedules quantization."""

    def __init__(self, config: QATConfig):
        self.config = config.validate()
        self.name = config.quantizer
        self.input_quantizers: list[nn.Module] = []

    def _weight_quantizer(self, layer: nn.Module, bits: int, name: str) -> nn.Module:
        c = self.config
        if c.quantizer == "lsq":
            channels = layer.weight.shape[0] if c.w_per_channel else None
            return LSQQuantizer(bits, signed=True, channels=channels, name=f"{name}.weight",
                                init=c.lsq_init)
        scheme = QScheme(bits, signed=True, symmetric=True, narrow=True)
        return ObservedQuantizer(scheme, axis=0 if c.w_per_channel else None,
                                 name=f"{name}.weight", observer="minmax")

    def _input_quantizer(self, bits: int | None, name: str) -> nn.Module | None:
        c = self.config
        if bits is None:
            return None
        if c.quantizer == "lsq":
            return LSQQuantizer(bits, signed=None, is_weight=False, name=f"{name}.input",
                                init=c.lsq_init)
        return ObservedQuantizer(QScheme(bits), name=f"{name}.input", observer="ema",
                                 momentum=c.act_momentum, enabled=c.act_quant_delay == 0)

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        plan = self.config.policy().resolve(layer_order(model, example), self.config.w_bits,
                                            self.config.a_bits)
        self.plan = plan

        def wrap(name, layer):
            if name not in plan:
                return None
            inputs = self._input_quantizer(plan[name].a_bits, name)
            if inputs is not None:
                self.input_quantizers.append(inputs)
            return WRAPPERS[type(layer)].from_float(
                layer, self._weight_quantizer(layer, plan[name].w_bits, name), inputs)
        return swap_layers(model, wrap)

    def finalize(self, model: nn.Module) -> nn.Module:
        """The trained model with its biases on the int32 accumulator grid ``S_W * S_X`` (as
        PTQ's ``int_bias``): what an integer device adds, so the simulation, the integer engine
        and onnxruntime add the same bias (a 4-bit LSQ MobileNetV3 otherwise disagrees with its
        engine on 0.3% of its layer outputs)."""
        round_biases(model)
        return model

    def after_step(self, model: nn.Module) -> None:
        for q in model.modules():
            if isinstance(q, LSQQuantizer):
                q.keep_step_positive()

    def before_step(self, model: nn.Module, epoch: int, step: int) -> None:
        c = self.config
        if c.quantizer == "ste" and c.act_quant_delay:
            for q in self.input_quantizers:
                q.set_enabled(step >= c.act_quant_delay)
        if c.freeze_bn_epoch is not None and epoch >= c.freeze_bn_epoch:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
