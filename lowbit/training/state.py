"""Training checkpoints: everything a resumed run needs to continue *exactly* (model with its
quantizer state, optimizer, scheduler, RNG, epoch, metrics), written atomically, and the check
that a resume file belongs to this model and these settings."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CheckpointError
from lowbit.io import load_torch, save_torch

FORMAT, VERSION = "lowbit-train", 1
# settings that may change between the interrupted run and its resume
RESUMABLE_CHANGES = {"device", "eval_every"}


def signature(model: nn.Module) -> dict[str, list[int] | None]:
    """State-dict keys, with the shapes of parameters: what must match for a checkpoint to belong
    to a model. (Buffer shapes are left out: quantizer state is sized when first calibrated.)"""
    params = {k: list(p.shape) for k, p in model.named_parameters()}
    return {k: params.get(k) for k in model.state_dict()}


def save_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, epoch: int,
                    settings: dict, metrics: list[dict]) -> Path:
    return save_torch(path, {
        "format": FORMAT, "version": VERSION, "epoch": epoch, "settings": settings,
        "signature": signature(model), "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(), "metrics": metrics})


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key not in RESUMABLE_CHANGES:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


def load_checkpoint(path: Path, model: nn.Module, settings: dict) -> dict:
    """Read a training checkpoint and refuse it, naming the differences, if it was made for
    another model or other settings."""
    ck = load_torch(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit training checkpoint")
    diff = _differences(ck["settings"], settings)
    theirs, ours = ck["signature"], signature(model)
    if theirs != ours:
        missing = [k for k in ours if k not in theirs]
        extra = [k for k in theirs if k not in ours]
        shapes = [f"{k} {theirs[k]} vs {ours[k]}" for k in ours if k in theirs
                  and theirs[k] != ours[k]]
        diff.append(f"model: missing {missing[:3]}, unexpected {extra[:3]}, shapes {shapes[:3]}")
    if diff:
        raise CheckpointError(f"cannot resume from {path}: it was made for a different run ("
                              + "; ".join(diff[:5]) + ")")
    return ck
