"""Where a computation runs: every ``device=`` argument and ``--device`` flag is checked here,
once, so that a missing GPU is one clear error and not a failure deep inside a pass."""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from lowbit.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(spec) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device`` -> a device this machine has."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {spec!r}: use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"device {spec!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r}: CUDA is not available on this machine "
                              "(a CPU build of PyTorch, or no GPU); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a stateless one)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def cpu_threads(n: int) -> int:
    """``n`` CPU threads for a runtime, clamped (with a warning) to the CPUs this process may
    use: more threads than cores only make the runs slower and their timings meaningless."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    if n > available:
        warnings.warn(f"{n} threads requested but this machine has {available} CPU(s) for this "
                      f"process: using {available}", stacklevel=2)
        return available
    return n
