"""A minimal supervised training loop (used by the demo to make its float model).

The full training engine (schedules, resume, DDP, QAT methods) builds on this.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.progress import progress


def fit(model: nn.Module, batches, epochs: int, lr: float = 3e-3, weight_decay: float = 1e-4,
        seed: int = 0) -> nn.Module:
    """Adam with cosine learning-rate decay on cross-entropy; deterministic for a seed."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(batches))
    model.train()
    for _ in progress(range(epochs), desc="train"):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()
