"""K-means weight sharing as a method (Deep Compression, Han et al. 2016): optional magnitude
pruning, per-layer (or per-output-channel) clustering at ``w_bits``, then centroid fine-tuning
with the indices frozen (``update="centroid"``: summed per-cluster gradients; ``"recentre"``:
train the float weights and reset each centroid to its cluster's mean after every step).

Without training (``epochs`` 0 in the benchmark) this is post-training weight sharing. The
first and last layers follow the shared policy: clustered at ``first_last_bits`` (8 by
default), or at ``w_bits`` like the rest when None.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.errors import ConfigError
from lowbit.methods.base import TrainingMethod
from lowbit.nn.layers import QUANT_LAYERS, WRAPPERS
from lowbit.nn.shared_weights import INITS, UPDATES, KMeansQuantizer
from lowbit.policy import LayerPolicy
from lowbit.quant.affine import check_bits
from lowbit.transforms import layer_order, swap_layers


@dataclass
class KMeansConfig(ConfigMixin):
    label = "k-means"

    w_bits: int = 4
    per_channel: bool = False
    init: str = "linear"
    update: str = "centroid"
    prune: float = 0.0
    first_last_bits: int | None = 8
    skip: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> "KMeansConfig":
        check_bits(self.w_bits, "w_bits")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.update not in UPDATES:
            raise ConfigError(f"update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"prune must be a fraction in [0, 1), got {self.prune}")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        return self


def magnitude_mask(w: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """True for the ``fraction`` of weights with the smallest magnitude (None if 0)."""
    if fraction <= 0:
        return None
    k = int(fraction * w.numel())
    if k == 0:
        return None
    threshold = w.abs().flatten().kthvalue(k).values
    return w.abs() <= threshold


class KMeansMethod(TrainingMethod):
    name = "kmeans"

    def __init__(self, config: KMeansConfig):
        self.config = config.validate()

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        c = self.config
        self.plan = LayerPolicy(c.first_last_bits, list(c.skip)).resolve(
            layer_order(model, example), c.w_bits, None)
        generator = torch.Generator().manual_seed(c.seed)

        def wrap(name, layer):
            if name not in self.plan:
                return None
            q = KMeansQuantizer(self.plan[name].w_bits, c.per_channel, c.init, c.update, name)
            q.cluster(layer.weight, magnitude_mask(layer.weight.detach(), c.prune), generator)
            return WRAPPERS[type(layer)].from_float(layer, q)
        return swap_layers(model, wrap)

    def after_step(self, model: nn.Module) -> None:
        if self.config.update == "recentre":
            for layer in model.modules():
                if isinstance(layer, QUANT_LAYERS) and isinstance(layer.weight_quantizer,
                                                                  KMeansQuantizer):
                    layer.weight_quantizer.recentre(layer.weight)
