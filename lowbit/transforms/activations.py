"""Remove ReLUs so binarized layers see signed inputs (BNN, XNOR-Net).

After a ReLU every input is >= 0 and sign() would be +1 everywhere. XNOR-Net's block order is
BN -> binary activation -> binary conv, with no ReLU in between, so binary-activation methods
replace every ReLU (module or function, ReLU6 and a hardtanh clamping at 0 too: MobileNetV2's
activation) by the identity in the traced graph; the sign's hardtanh straight-through
estimator plays the activation's role.
"""
from __future__ import annotations

from torch import fx, nn

from lowbit.errors import ModelError
from lowbit.transforms.fold import trace
from lowbit.transforms.ops import clamp_bounds, kind_of

def remove_relus(model: nn.Module) -> tuple[fx.GraphModule, int]:
    """(traced model with every ReLU bypassed, how many were removed): every clamp of
    :mod:`lowbit.transforms.ops` whose lower bound is >= 0 (ReLU, ReLU6, hardtanh(0, x),
    clamp(min=0), as module, function or method)."""
    traced, reason = trace(model)
    if traced is None:
        raise ModelError(f"binary activations need a traceable model to remove its ReLUs: {reason}")
    modules = dict(traced.named_modules())
    removed = 0
    for node in list(traced.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if kind_of(node, modules, set()) == "clamp" and clamp_bounds(node, module)[0] >= 0:
            node.replace_all_uses_with(node.args[0])
            traced.graph.erase_node(node)
            removed += 1
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced, removed
