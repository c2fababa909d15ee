"""The training engine: one loop (optimizers, schedules, augmentation, distillation, metrics,
exact resume, DDP) that every training method plugs into."""
from lowbit.training.config import TrainConfig
from lowbit.training.engine import TrainResult, estimate_bn_statistics, train

__all__ = ["TrainConfig", "TrainResult", "estimate_bn_statistics", "train"]
