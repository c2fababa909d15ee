"""Find quantizable layers, their execution order, and swap them for quantized wrappers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.nn.layers import WRAPPERS


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Conv2d`` / ``nn.Linear`` (exact types) by qualified name."""
    return {name: m for name, m in model.named_modules() if type(m) in WRAPPERS}


@torch.no_grad()
def layer_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the quantizable layers in the order a forward pass first calls them (run in eval
    mode, so BN statistics are untouched)."""
    order, handles, was_training = [], [], model.training
    model.eval()
    for name, layer in quantizable_layers(model).items():
        handles.append(layer.register_forward_pre_hook(
            lambda _m, _i, name=name: order.append(name) if name not in order else None))
    try:
        model(example[:2])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def swap_layers(model: nn.Module, make_wrapper: Callable[[str, nn.Module], nn.Module | None]):
    """Replace each quantizable layer named in place by ``make_wrapper(name, layer)`` (None keeps
    the float layer). Works for any nesting: the parent is found from the qualified name."""
    for name, layer in list(quantizable_layers(model).items()):
        new = make_wrapper(name, layer)
        if new is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model
