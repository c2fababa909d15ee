"""Bi-Real Net's real-valued shortcuts around every binary convolution (Liu et al. 2018).

A binary convolution followed by its BatchNorm becomes ``BN(BinConv(sign(x))) + shortcut(x)``:
the real activation ``x`` bypasses the sign, so each block carries real values forward and the
binary convolution only adds a correction (Bi-Real's "one shortcut per convolution", where
ResNet has one per two). With ``rprelu`` the sum then passes ReActNet's RPReLU (Liu et al.
2020), the learnable nonlinearity after each shortcut.

The shortcut has no weights (:class:`RealShortcut`): average pooling by the convolution's stride,
then channels repeated (the output a multiple of the input, ReActNet's concatenation of copies)
or averaged in adjacent groups (the input a multiple of the output): the real-valued
downsampling path of Bi-Real / ReActNet, in float. Where a binary conv's BatchNorm already feeds
the network's own residual sum, that sum's shortcut operand is replaced (see
:func:`add_real_shortcuts`), so a ResNet's own shortcuts, option A or 1x1 downsampling convs,
are superseded. A convolution whose output shape no such shortcut reaches (channel counts that do not divide,
a padding that changes the size) keeps no shortcut, and is named in the returned list.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from lowbit.nn.binary import RPReLU


class RealShortcut(nn.Module):
    """Weight-free map ``[N, C_in, H, W] -> [N, C_out, ceil(H / s), ceil(W / s)]``: average
    pooling over s x s windows (the partial windows of odd sizes averaged over what they hold),
    then channels repeated ``C_out / C_in`` times or averaged in groups of ``C_in / C_out``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True, count_include_pad=False)
        if self.out_channels > self.in_channels:
            return x.repeat(1, self.out_channels // self.in_channels, 1, 1)
        if self.out_channels < self.in_channels:
            n, _, h, w = x.shape
            return x.reshape(n, self.out_channels, -1, h, w).mean(2)
        return x

    @staticmethod
    def reaches(in_shape, out_shape, stride: int) -> bool:
        """Whether the shortcut maps ``in_shape`` onto ``out_shape``."""
        (_, cin, h, w), (_, cout, oh, ow) = in_shape, out_shape
        divides = cout % cin == 0 if cout >= cin else cin % cout == 0
        return divides and (oh, ow) == (-(-h // stride), -(-w // stride))


def _residual_sum(bn: fx.Node) -> fx.Node | None:
    """The add that is ``bn``'s only user (the network's own residual sum), or None."""
    users = list(bn.users)
    if len(users) == 1 and users[0].op == "call_function" and \
            users[0].target in (operator.add, torch.add) and len(users[0].args) == 2:
        return users[0]
    return None


def _other_operand(add: fx.Node, bn: fx.Node) -> fx.Node:
    return add.args[1] if add.args[0] is bn else add.args[0]


def add_real_shortcuts(model: fx.GraphModule, convs, example: torch.Tensor,
                       rprelu: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """``(model, names left without a shortcut)``: every convolution named in ``convs`` whose
    only user is a BatchNorm gets ``BN(conv(x)) + RealShortcut(x)`` (then RPReLU with
    ``rprelu``), in place of the BN output wherever it was used. Where the BN already feeds
    the network's own residual sum ``BN(...) + s(x0)`` (ResNet's second conv), the sum's other
    operand is replaced instead: the block becomes Bi-Real's chain ``h = BN1 + x0``,
    ``out = BN2 + h`` rather than counting the block input twice, and the network's own
    shortcut (option A, or a downsampling conv) drops out, superseded by the weight-free one
    of the first conv."""
    ShapeProp(model).propagate(example)
    modules = dict(model.named_modules())
    wanted, skipped, places = set(convs), [], []
    for node in model.graph.nodes:  # shapes first: the nodes added below have none
        if node.op != "call_module" or node.target not in wanted:
            continue
        conv, users = modules[node.target], list(node.users)
        bn = users[0] if len(users) == 1 else None
        if bn is None or bn.op != "call_module" or \
                not isinstance(modules.get(bn.target), nn.BatchNorm2d):
            skipped.append(node.target)
            continue
        in_shape = node.args[0].meta["tensor_meta"].shape
        out_shape = bn.meta["tensor_meta"].shape
        if conv.stride[0] != conv.stride[1] or \
                not RealShortcut.reaches(in_shape, out_shape, conv.stride[0]):
            skipped.append(node.target)
            continue
        places.append((node, bn, in_shape, out_shape, conv.stride[0]))
    for node, bn, in_shape, out_shape, stride in places:
        x = node.args[0]  # the conv's input now: an earlier shortcut's output, maybe
        shortcut = f"{node.target}_shortcut"
        model.add_submodule(shortcut, RealShortcut(in_shape[1], out_shape[1], stride))
        residual = _residual_sum(bn)
        with model.graph.inserting_before(residual or bn.next):
            real = model.graph.call_module(shortcut, (x,))
        if residual is not None:  # the network's own sum: Bi-Real's shortcut supersedes its
            residual.replace_input_with(_other_operand(residual, bn), real)  # other operand
            out = residual
        else:
            with model.graph.inserting_after(real):
                out = model.graph.call_function(operator.add, (bn, real))
            bn.replace_all_uses_with(out, delete_user_cb=lambda user, add=out: user is not add)
        if rprelu:
            activation = f"{node.target}_rprelu"
            model.add_submodule(activation, RPReLU(out_shape[1]))
            with model.graph.inserting_after(out):
                act = model.graph.call_module(activation, (out,))
            out.replace_all_uses_with(act, delete_user_cb=lambda user, act=act: user is not act)
    model.graph.eliminate_dead_code()  # the superseded shortcuts
    model.delete_all_unused_submodules()
    model.graph.lint()
    model.recompile()
    return model, skipped
