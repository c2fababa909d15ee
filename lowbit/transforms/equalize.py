"""Cross-layer equalization over a traced graph (Nagel et al. 2019, DFQ section 4.1).

Pairs are conv -> [ReLU] -> conv where the first conv's output (and the ReLU's) has exactly one
user, so rescaling its channels changes nothing else; ReLU is positively homogeneous, so
``relu(x / s) = relu(x) / s`` for s > 0. The math is :func:`lowbit.quant.equalization_scales`.
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from lowbit.quant.equalize import equalization_scales
from lowbit.transforms.ops import clamp_bounds, kind_of

def _is_relu(node: fx.Node, modules: dict) -> bool:
    """A clamp at [0, inf) (ReLU as module, function or method; :mod:`lowbit.transforms.ops`):
    positively homogeneous, unlike ReLU6's upper bound."""
    module = modules.get(node.target) if node.op == "call_module" else None
    return kind_of(node, modules, set()) == "clamp" and \
        clamp_bounds(node, module) == (0.0, math.inf)


def equalization_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Names of (first conv, second conv) pairs that can be equalized."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        src = node
        if len(src.users) != 1:
            continue
        nxt = next(iter(src.users))
        if _is_relu(nxt, modules):
            src = nxt
            if len(src.users) != 1:
                continue
            nxt = next(iter(src.users))
        second = modules.get(nxt.target) if nxt.op == "call_module" else None
        if not isinstance(second, nn.Conv2d):
            continue
        plain_or_depthwise = second.groups == 1 or second.weight.shape[1] == 1
        if plain_or_depthwise and nxt.args and nxt.args[0] is src:
            pairs.append((node.target, nxt.target))
    return pairs


@torch.no_grad()
def equalize_model(gm: fx.GraphModule, iterations: int = 20, tol: float = 1e-6) -> list:
    """Equalize every pair in place, repeating until the scales stop changing. Returns the pairs."""
    modules = dict(gm.named_modules())
    pairs = equalization_pairs(gm)
    for _ in range(iterations):
        worst = 0.0
        for a, b in pairs:
            conv1, conv2 = modules[a], modules[b]
            s = equalization_scales(conv1.weight, conv2.weight, conv2.groups)
            conv1.weight.div_(s.reshape(-1, *([1] * (conv1.weight.dim() - 1))))
            if conv1.bias is not None:
                conv1.bias.div_(s)
            if conv2.groups == 1:
                conv2.weight.mul_(s.reshape(1, -1, 1, 1))
            else:  # depthwise: input channel i feeds output channels [i*m, (i+1)*m)
                per_out = s.repeat_interleave(conv2.out_channels // conv2.groups)
                conv2.weight.mul_(per_out.reshape(-1, 1, 1, 1))
            worst = max(worst, float((s - 1).abs().max()))
        if worst < tol:
            break
    return pairs
