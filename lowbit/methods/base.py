"""What the training engine calls on a method; subclasses override the hooks they need."""
from __future__ import annotations

import torch
from torch import nn


class TrainingMethod:
    """``prepare`` returns the model to train; ``before_step`` / ``after_step`` run around every
    optimizer step (schedules; clipping or re-centring latent weights); ``finalize`` returns
    the model to save and evaluate at the end."""

    name = "fp"

    def prepare(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        return model

    def before_step(self, model: nn.Module, epoch: int, step: int) -> None:
        """Nothing to schedule by default."""

    def after_step(self, model: nn.Module) -> None:
        """Nothing to do after the update by default."""

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
