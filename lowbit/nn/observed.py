"""The STE QAT fake quantizer (Jacob et al. 2018; Krishnamoorthi 2018; ALGORITHMS.md 0.2-0.3):
an :class:`AffineQuantizer` whose range follows the tensor it quantizes.

* ``observer="minmax"`` (weights): the exact min / max of the current tensor at every call.
* ``observer="ema"`` (activations): r_hat <- momentum * r_batch + (1 - momentum) * r_hat in
  training mode, the first tensor initialising it; frozen in eval mode.

Under DistributedDataParallel the batch min / max are reduced over all processes before they
enter the average (as SyncBatchNorm does for its statistics), so every rank holds the same
range: the one a single process would compute on the whole batch.

``enabled`` (a buffer, so checkpoints keep it) switches the fake quantization off while the
range is still tracked: Jacob et al. delay activation quantization for the first steps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lowbit.errors import ConfigError
from lowbit.nn.quantizer import AffineQuantizer
from lowbit.quant.affine import QScheme
from lowbit.quant.ranges import ema_update, minmax_range

OBSERVERS = ("minmax", "ema")


class ObservedQuantizer(AffineQuantizer):
    lazy_buffers = AffineQuantizer.lazy_buffers + ("running_min", "running_max")

    def __init__(self, scheme: QScheme, axis: int | None = None, name: str = "",
                 observer: str = "minmax", momentum: float = 0.01, enabled: bool = True):
        if observer not in OBSERVERS:
            raise ConfigError(f"observer must be one of {OBSERVERS}, got {observer!r}")
        super().__init__(scheme, axis, name)
        self.observer, self.momentum = observer, momentum
        self.register_buffer("running_min", torch.empty(0))
        self.register_buffer("running_max", torch.empty(0))
        self.register_buffer("enabled", torch.tensor(enabled))
        self._enabled = enabled  # mirrors the buffer: no host read in the forward

    def set_enabled(self, enabled: bool) -> None:
        self.enabled.fill_(enabled)
        self._enabled = enabled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._enabled = bool(self.enabled)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax_range(x.detach(), self.axis)
        if self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if self.observer == "ema" and self.running_min.numel():
            lo = ema_update(self.running_min, lo, self.momentum)
            hi = ema_update(self.running_max, hi, self.momentum)
        self.running_min, self.running_max = lo, hi
        # signedness is the data's: an input that goes negative (an image) gets a signed grid
        self.set_range(lo, hi, signed=True if self.scheme.signed else (lo < 0).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer == "minmax" or self.training or not self.calibrated:
            self.observe(x)
        return super().forward(x) if self._enabled else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, observer={self.observer}"
