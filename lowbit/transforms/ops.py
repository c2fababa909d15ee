"""What each traced op means on an integer device: one table of functions, methods and module
types, read by the deploy lowering (:mod:`lowbit.deploy.lowering`) and by the graph transforms
that must recognise the same ops (:func:`lowbit.transforms.remove_relus`)."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.nn.layers import QUANT_LAYERS

# What each kind means on an integer device (the engine has one kernel per kind).
KINDS = {
    "layer": "Conv / Linear: int32 accumulation, fixed-point requantization",
    "clamp": "ReLU, ReLU6, hardtanh, clamp: integer bounds",
    "lut": "a smooth elementwise function: a table over the input's integer codes",
    "add": "elementwise sum: operands rescaled to the output grid",
    "mul": "elementwise product (squeeze-excite): one fixed-point rescale",
    "concat": "inputs requantized to the output grid",
    "avgpool": "average pooling: integer sums times 1/n",
    "maxpool": "max pooling on integers",
    "resize": "nearest (integer copies) or bilinear (interpolated integers) upsampling",
    "move": "reshape, permute, slice, chunk, pad, dropout: integers moved, not changed",
    "meta": "a non-tensor value (a size, an index)",
}
MOVES = {"move", "maxpool"}            # pure data movement: the output is on the input's grid
KEEPS_GRID = MOVES | {"clamp", "resize"}

_CLAMP = {F.relu: (0.0, math.inf), torch.relu: (0.0, math.inf), F.relu6: (0.0, 6.0),
          F.hardtanh: (-1.0, 1.0), torch.clamp: (-math.inf, math.inf),
          torch.clip: (-math.inf, math.inf)}
_CLAMP_METHODS = {"relu": (0.0, math.inf), "relu_": (0.0, math.inf),
                  "clamp": (-math.inf, math.inf), "clip": (-math.inf, math.inf)}
_FUNCTIONS = {
    **{f: "lut" for f in (F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.leaky_relu, F.elu,
                          F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.mish, F.softplus,
                          F.prelu)},
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.sub: "sub", torch.sub: "sub", operator.truediv: "div", torch.div: "div",
    torch.cat: "concat", torch.concat: "concat",
    F.adaptive_avg_pool2d: "avgpool", F.avg_pool2d: "avgpool",
    F.max_pool2d: "maxpool", F.interpolate: "resize",
    torch.flatten: "move", torch.reshape: "move", torch.transpose: "move",
    torch.permute: "move", torch.squeeze: "move", torch.unsqueeze: "move",
    torch.chunk: "move", torch.split: "move", operator.getitem: "move", F.pad: "move",
    F.dropout: "move",
    getattr: "meta", operator.floordiv: "meta",
}
_METHODS = {
    **{m: "move" for m in ("flatten", "view", "reshape", "permute", "transpose", "contiguous",
                           "squeeze", "unsqueeze", "chunk", "split")},
    "sigmoid": "lut", "tanh": "lut", "add": "add", "mul": "mul", "mean": "avgpool",
    "size": "meta", "dim": "meta",
}
_MODULES = (
    ((nn.ReLU, nn.ReLU6, nn.Hardtanh), "clamp"),
    ((nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU,
      nn.PReLU, nn.ELU, nn.Mish, nn.Softplus, nn.BatchNorm1d, nn.BatchNorm2d), "lut"),
    ((nn.AdaptiveAvgPool2d, nn.AvgPool2d), "avgpool"),
    ((nn.MaxPool2d,), "maxpool"),
    ((nn.Upsample,), "resize"),
    ((nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout2d), "move"),
)


def clamp_bounds(node: fx.Node, module: nn.Module | None) -> tuple[float, float]:
    """(lo, hi) of a clamp node, read from its module (None for a function or method) or its
    arguments."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    lo, hi = (_CLAMP_METHODS if node.op == "call_method" else _CLAMP)[node.target]
    names = ("min_val", "max_val") if node.target is F.hardtanh else ("min", "max")
    given = list(node.args[1:3])
    given += [None] * (2 - len(given))
    for i, key in enumerate(names):
        if key in node.kwargs:
            given[i] = node.kwargs[key]
    if node.target in (F.relu, torch.relu, F.relu6) or node.target in ("relu", "relu_"):
        return lo, hi
    lo = float(given[0]) if given[0] is not None else lo
    hi = float(given[1]) if given[1] is not None else hi
    return lo, hi


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node arguments of ``node`` (inside lists too, as ``torch.cat`` takes them)."""
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def kind_of(node: fx.Node, modules: dict, meta: set) -> str | None:
    """The :data:`KINDS` entry of a node, or None for an op lowbit has no integer form of.
    ``meta`` holds the nodes already known to compute non-tensor values."""
    inputs = tensor_args(node)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, QUANT_LAYERS):
            return "layer"
        return next((kind for types, kind in _MODULES if isinstance(module, types)), None)
    if node.op == "call_method":
        kind = "clamp" if node.target in _CLAMP_METHODS else _METHODS.get(node.target)
    elif node.op == "call_function":
        kind = "clamp" if node.target in _CLAMP else _FUNCTIONS.get(node.target)
        if getattr(node.target, "__name__", "") == "stochastic_depth" and \
                node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True) is False:
            kind = "move"  # torchvision's StochasticDepth in eval mode is the identity
    else:
        return None
    if inputs and all(a in meta for a in inputs):
        return "meta"  # arithmetic on sizes
    tensors = [a for a in inputs if a not in meta]
    if kind in ("add", "mul", "sub", "div"):
        # one tensor and constants: an elementwise function of one integer tensor
        return "lut" if len(tensors) == 1 else (kind if kind in ("add", "mul") else None)
    return kind


def yields_tuple(node: fx.Node) -> bool:
    """A move whose value is a tuple of tensors (``chunk``, ``split``), not one tensor."""
    return node.target in ("chunk", "split") if node.op == "call_method" else \
        node.target in (torch.chunk, torch.split)


def adaptive_window(node: fx.Node, module: nn.Module | None, height: int, width: int):
    """The (kernel = stride) window of an adaptive average pooling node over an input of
    ``height`` x ``width``; None when it is not one, or its windows are uneven (they would
    overlap or differ in size)."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
    else:
        return None
    oh, ow = (size, size) if isinstance(size, int) else size
    oh, ow = oh or height, ow or width
    if height % oh or width % ow:
        return None
    return height // oh, width // ow

