"""The settings of one training run (every training method shares them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.config import ConfigMixin
from lowbit.devices import resolve_device
from lowbit.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "constant")


@dataclass
class TrainConfig(ConfigMixin):
    """Optimizer, schedule, data augmentation, distillation and bookkeeping of a run.

    ``milestones`` count epochs as PyTorch's MultiStepLR does: after ``m`` completed epochs the
    LR is multiplied by ``gamma``; the cosine schedule decays per step to 0 over the whole run
    (Loshchilov & Hutter 2017), or with ``milestones`` restarts at each of them from the full LR
    and decays to 0 by the next (SGDR's warm restarts: one schedule per stage of a two-stage
    binary run). ``distill`` adds Hinton et al.'s (2015)
    knowledge-distillation term from the float model: ``(1 - kd_alpha) * CE + kd_alpha * T^2 *
    KL(softmax(t / T) || softmax(s / T))``. ``reflect_pad`` pads the random crops by reflection
    instead of zeros; fine-tune a checkpoint with the padding it was trained with (`lowbit
    train` defaults to the model's own, ``ModelInfo.reflect_pad``): the other one shifts the
    BatchNorm statistics (``benchmarks/bn_padding.py``). ``compile`` runs the training step
    through ``torch.compile`` (eager, with one warning, where compilation fails);
    ``channels_last`` keeps 4-D weights and inputs in NHWC memory order. Both change only how
    the step is computed: results equal eager within float rounding, and a run resumes
    bit-identical to an uninterrupted one in the same mode.
    """

    label = "training"

    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    augment: bool = True
    reflect_pad: bool = False
    distill: bool = False
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1
    compile: bool = False
    channels_last: bool = False

    def validate(self) -> "TrainConfig":
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.kd_alpha <= 1 or not self.kd_temperature > 0:
            raise ConfigError("kd_alpha must be in [0, 1] and kd_temperature positive")
        if any(not isinstance(m, int) or m < 1 for m in self.milestones):
            raise ConfigError(f"milestones must be positive epoch numbers, got {self.milestones}")
        resolve_device(self.device)
        return self


