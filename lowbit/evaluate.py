"""Top-1 accuracy of a model on batches of (input, target), and the agreement of two models."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.devices import module_device
from lowbit.errors import DataError
from lowbit.progress import progress


@torch.no_grad()
def evaluate(model, data, limit: int | None = None, desc: str = "eval") -> float:
    """Top-1 accuracy in percent of ``model`` (an ``nn.Module``, or any callable mapping a batch to
    logits, e.g. an onnxruntime session wrapper) over ``data`` (an iterable of ``(input,
    target)`` batches), stopping after ``limit`` examples if given. A module runs where it is:
    each batch is moved to its device (a callable gets the batches as they come)."""
    device = None
    if isinstance(model, nn.Module):
        model.eval()
        device = module_device(model)
    correct = seen = 0
    for x, y in progress(data, desc=desc):
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        if device is not None:
            x = x.to(device, non_blocking=True)
        correct += (model(x).argmax(1).cpu() == y).sum().item()
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise DataError("nothing to evaluate: the data is empty")
    return 100.0 * correct / seen


@torch.no_grad()
def agreement(reference, candidate, data, limit: int | None = None, desc: str = "compare") -> dict:
    """How closely ``candidate`` (e.g. the integer engine, an onnxruntime session) reproduces
    ``reference`` (the fake-quant simulation) on ``data``: both top-1 accuracies, the share of
    images whose top-1 class agrees, and the logit differences in units of an 8-bit output step
    (the reference logits' whole range over ``data`` / 255, as a uint8 output quantizer would
    have): their maximum and the share of images whose every logit is within one step."""
    if isinstance(reference, nn.Module):
        reference.eval()
    diffs, same, right, right_ref, seen = [], 0, 0, 0, 0
    lo, hi = float("inf"), float("-inf")
    for x, y in progress(data, desc=desc):
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        a, b = reference(x).float(), torch.as_tensor(candidate(x)).float()
        same += (a.argmax(1) == b.argmax(1)).sum().item()
        right_ref += (a.argmax(1) == y).sum().item()
        right += (b.argmax(1) == y).sum().item()
        lo, hi = min(lo, a.min().item()), max(hi, a.max().item())
        diffs.append((a - b).abs().amax(1))
        if limit is not None and seen >= limit:
            break
    if not diffs:
        raise DataError("nothing to compare: the data is empty")
    worst = torch.cat(diffs) / ((hi - lo) / 255 or 1.0)
    n = len(worst)
    return {"images": n, "top1_reference": 100.0 * right_ref / n, "top1": 100.0 * right / n,
            "top1_agreement": 100.0 * same / n, "max_logit_diff_steps": worst.max().item(),
            "within_one_step": 100.0 * (worst <= 1).float().mean().item()}
