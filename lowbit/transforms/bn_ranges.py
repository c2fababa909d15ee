"""Which BatchNorm feeds each layer's input, for data-free activation ranges (DFQ, Nagel et al.
2019 sec. 5; the PSG reference's ``--act_clipping``).

In the traced graph, the input of a Conv / Linear is followed back through ReLU (module or
function), residual adds and shape-only operations until a BatchNorm module is reached. At an
add the first operand is followed: in a residual block that is the block's own branch
(``bn2(conv2(x)) + shortcut``), the BN the reference uses, ignoring the residual's
contribution as it does. Layers reached through anything else (the image, pooling of
unknown ranges, ...) have no BN source.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.nn.layers import WRAPPERS
from lowbit.transforms.fold import trace

_PASS_FUNCTIONS = {F.relu, torch.relu, operator.add, torch.add, torch.flatten,
                   operator.iadd}
_PASS_METHODS = {"relu", "relu_", "add", "add_", "flatten", "view", "reshape", "contiguous"}
_PASS_MODULES = (nn.ReLU, nn.Flatten, nn.Identity)


def bn_sources(model: nn.Module) -> tuple[dict[str, nn.BatchNorm2d], str]:
    """``({layer name: the BatchNorm feeding its input}, "")``, or ``({}, reason)`` when the
    model cannot be traced."""
    traced, reason = trace(model)
    if traced is None:
        return {}, reason
    modules = dict(traced.named_modules())
    sources = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in WRAPPERS:
            bn = _find_bn(node.args[0], modules)
            if bn is not None:
                sources[node.target] = bn
    return sources, ""


def _find_bn(node, modules) -> nn.BatchNorm2d | None:
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.BatchNorm2d):
                return module
            if not isinstance(module, _PASS_MODULES):
                return None
        elif node.op == "call_function" and node.target not in _PASS_FUNCTIONS:
            return None
        elif node.op == "call_method" and node.target not in _PASS_METHODS:
            return None
        elif node.op not in ("call_module", "call_function", "call_method"):
            return None
        node = node.args[0]
    return None
