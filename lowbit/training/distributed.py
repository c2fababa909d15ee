"""Data-parallel training through ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on
CUDA). Outside torchrun every helper is a no-op for a single process.

Quantizer state kept consistent across ranks: parameters (weights, LSQ steps) are identical
because DDP broadcasts them from rank 0 at wrap time and all-reduces their gradients; floating
buffers (BN running statistics, EMA activation ranges) are *averaged* over the ranks after every
step (:func:`average_buffers`), which for an EMA equals the EMA of the rank-averaged batch
statistics.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def wrap(model: nn.Module, device: str) -> nn.Module:
    """DDP-wrap ``model`` when distributed (buffers are averaged by us, not broadcast)."""
    if world()[1] == 1:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average every floating buffer over the ranks (in place)."""
    _, size = world()
    if size == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point() and buffer.numel():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(size)


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a few numbers over the ranks."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
