"""Training checkpoints: everything a resumed run needs to continue *exactly* (model with its
quantizer state, optimizer, scheduler, RNG, epoch, metrics), written atomically, and the check
that a resume file belongs to this model and these settings."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit import untrusted
from lowbit.errors import CheckpointError
from lowbit.io import load_torch, save_torch

FORMAT, VERSION = "lowbit-train", 1
# settings that may change between the interrupted run and its resume
RESUMABLE_CHANGES = {"device", "eval_every", "compile", "channels_last"}


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


def _check_fields(ck: dict, where: str) -> None:
    """The types of everything a resume reads (the file may not be the one this run wrote)."""
    untrusted.integer(ck.get("version"), f"{where}: 'version'", 1, VERSION)
    untrusted.integer(ck.get("epoch"), f"{where}: 'epoch'", 0)
    untrusted.mapping(ck.get("settings"), f"{where}: 'settings'")
    for key, dims in untrusted.mapping(ck.get("signature"), f"{where}: 'signature'").items():
        if dims is not None:
            untrusted.shape(dims, f"{where}: signature {key!r}")
    untrusted.tensor_dict(ck.get("state_dict"), f"{where}: 'state_dict'")
    untrusted.mapping(ck.get("optimizer"), f"{where}: 'optimizer'")
    untrusted.mapping(ck.get("scheduler"), f"{where}: 'scheduler'")
    rng = ck.get("rng")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise untrusted.refuse(f"{where}: 'rng'", "must be a uint8 tensor (torch.get_rng_state)")
    for i, row in enumerate(untrusted.sequence(ck.get("metrics"), f"{where}: 'metrics'")):
        untrusted.mapping(row, f"{where}: metrics[{i}]")


def load_checkpoint(path: Path, model: nn.Module, settings: dict) -> dict:
    """Read a training checkpoint and refuse it, naming the differences, if it was made for
    another model or other settings."""
    ck = load_torch(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit training checkpoint")
    _check_fields(ck, str(path))
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
