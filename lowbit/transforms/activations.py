"""Remove ReLUs so binarized layers see signed inputs (BNN, XNOR-Net).

After a ReLU every input is >= 0 and sign() would be +1 everywhere. XNOR-Net's block order is
BN -> binary activation -> binary conv, with no ReLU in between, so binary-activation methods
replace every ReLU (module or function, ReLU6 and a hardtanh clamping at 0 too: MobileNetV2's
activation) by the identity in the traced graph; the sign's hardtanh straight-through
estimator plays the activation's role.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.errors import ModelError
from lowbit.transforms.fold import trace

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6}


def remove_relus(model: nn.Module) -> tuple[fx.GraphModule, int]:
    """(traced model with every ReLU bypassed, how many were removed)."""
    traced, reason = trace(model)
    if traced is None:
        raise ModelError(f"binary activations need a traceable model to remove its ReLUs: {reason}")
    modules = dict(traced.named_modules())
    removed = 0
    for node in list(traced.graph.nodes):
        is_relu = (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
            (node.op == "call_module" and isinstance(modules[node.target], nn.ReLU)) or \
            (node.op == "call_module" and isinstance(modules[node.target], nn.Hardtanh)
             and modules[node.target].min_val >= 0) or \
            (node.op == "call_method" and node.target in ("relu", "relu_"))
        if is_relu:
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
            removed += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, removed
