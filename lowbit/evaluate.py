"""Top-1 accuracy of a model on batches of (input, target)."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import DataError
from lowbit.progress import progress


@torch.no_grad()
def evaluate(model, data, limit: int | None = None, desc: str = "eval") -> float:
    """Top-1 accuracy in percent of ``model`` (an ``nn.Module``, or any callable mapping a batch to
    logits, e.g. an onnxruntime session wrapper) over ``data`` (an iterable of ``(input,
    target)`` batches), stopping after ``limit`` examples if given."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = seen = 0
    for x, y in progress(data, desc=desc):
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        correct += (model(x).argmax(1) == y).sum().item()
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise DataError("nothing to evaluate: the data is empty")
    return 100.0 * correct / seen
