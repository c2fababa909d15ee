"""File I/O: atomic writes and checkpoint reading with clear errors."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from lowbit.errors import CheckpointError
from lowbit.untrusted import check_tensors, check_torch_archive


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(path, obj) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path):
    """``torch.load(weights_only=True)`` of a file that may come from anyone: its archive
    checked first and its tensors after (:mod:`lowbit.untrusted`); a CheckpointError for a
    missing, corrupt, altered or oversized file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    check_torch_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        lines = str(e).splitlines() or [""]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{lines[0][:200]}") from None
    check_tensors(obj, str(path))
    return obj


def extract_state_dict(obj, path="checkpoint") -> dict:
    """The state_dict inside a checkpoint: a bare state_dict, or one under 'state_dict' / 'model'.
    A ``module.`` prefix (DataParallel) is removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: torch.nn.Module, state: dict, path="checkpoint",
                 exact_dtypes: bool = False) -> None:
    """Load ``state`` strictly; on mismatch name the missing / unexpected / mis-shaped keys.
    ``exact_dtypes`` (lowbit's own files, which always hold the model's dtypes) also refuses a
    tensor that PyTorch would silently cast."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape and own[k].numel() > 0]
    if exact_dtypes:
        shapes += [f"{k} {state[k].dtype} vs {own[k].dtype}" for k in own
                   if k in state and state[k].dtype != own[k].dtype]
    # BatchNorm's num_batches_tracked is absent from older checkpoints; PyTorch fills it in.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape or dtype", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label} keys: {', '.join(keys[:4])}{more}")
        raise CheckpointError(f"{path} does not match the model: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor that cannot be copied into its slot (dtype, shape)
        raise CheckpointError(f"{path} does not match the model: "
                              f"{str(e).splitlines()[-1].strip()[:200]}") from None
