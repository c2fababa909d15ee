"""XNOR-popcount inference for XNOR-Net layers (Rastegari et al. 2016).

A trained XNOR-Net convolution computes ``conv(sign(I), alpha * sign(W)) * K + b`` (K: the box
filtered channel mean of ``|I|``, :func:`lowbit.quant.binary.xnor_input_scale`). Deployed, the
signs are bits: each output pixel's receptive field is one packed row of ``K = KH*KW*C`` bits
with a mask that is 0 on taps outside the image (zero padding adds 0), and

    dot = 2 * popcount(XNOR(A, W) & mask) - popcount(mask)        (sum a*w = -n + 2 popcount)
    out = dot * alpha[o] * K[n, y, x] + b[o]

``xnor_kernel.cpp`` holds the compiled kernel (packing, im2col of bits, and the popcount GEMM,
vectorised across output pixels), built on first use with PyTorch's extension tools. The GEMM has
one path per instruction set (scalar, AVX2, AVX-512BW, AVX-512 VPOPCNTDQ) in the same build,
chosen at run time by what the CPU reports (:func:`kernel_path`; ``LOWBIT_XNOR_ISA`` forces a
slower one); every path gives the same integers. Where the kernel cannot build, the same
numbers come from a pure-torch path (a float convolution of the +-1 signs, exact for these
integer sums) with a warning. The kernel sums K's |I| inside its packing and im2col passes (no
separate passes over the activation) in the order :func:`~lowbit.quant.binary.xnor_input_scale`
fixes, and both paths compute ``dot * alpha * K + b`` in that order in float32, so their outputs
are identical to each other and to the simulation.

:func:`deploy_xnor` also fuses what follows each binary convolution into the kernel's epilogue
(:func:`fuse_epilogues`): the eval BatchNorm after it, a residual add after that, and, where the
result feeds binary convolutions, their input itself: the sign bits of ``y - t`` (``t`` the
consumers' RSign threshold) and the channel sums of ``|y - t|`` that K needs
(:class:`PackedSigns`), so a binary block passes packed bits from one convolution to the next
(Larq Compute Engine's bconv2d with output binarization, here with XNOR-Net's K). The fused steps
compute what the separate modules compute, in the same float order: the BatchNorm as ATen's CPU
kernel does (``fma(y, scale, shift)``, checked against ``F.batch_norm`` before fusing: a build that
rounds otherwise is left unfused), the add as one float addition, the signs and sums as
:func:`pack_signs` does; so the fused network's outputs stay bit-identical to the simulation.
"""
from __future__ import annotations

import copy
import operator
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.errors import ConfigError
from lowbit.nn.binary import BinaryWeight, SignActivation, XNORConv2d
from lowbit.nn.layers import QUANT_LAYERS, QuantConv2d
from lowbit.quant.binary import binarize, xnor_input_scale

SOURCE = Path(__file__).with_name("xnor_kernel.cpp")


@lru_cache(maxsize=1)
def extension():
    """The compiled kernel module, or None (with a warning) when it cannot be built;
    ``LOWBIT_XNOR_KERNEL=torch`` forces the pure-torch path."""
    if os.environ.get("LOWBIT_XNOR_KERNEL") == "torch":
        return None
    try:
        from torch.utils.cpp_extension import load

        build = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "xnor"
        build.mkdir(parents=True, exist_ok=True)
        # no -march: each GEMM path carries its own target attribute and is picked at run time
        return load(name="lowbit_xnor", sources=[str(SOURCE)], build_directory=str(build),
                     extra_cflags=["-O3", "-ffp-contract=off"], verbose=False)
    except Exception as e:  # a missing compiler or ninja, a failed build: fall back
        warnings.warn(f"XNOR kernel not built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using the pure-torch path (same results, slower)", stacklevel=2)
        return None


@lru_cache(maxsize=1)
def supported_paths() -> tuple[str, ...]:
    """The GEMM paths the running CPU supports, slowest first (the compiled kernel's report)."""
    return tuple(extension().supported_paths())


def kernel_path(requested: str | None = None) -> str:
    """The popcount GEMM path to run: ``requested`` (default ``$LOWBIT_XNOR_ISA``) if this CPU
    supports it, else the best it supports ("avx512vpopcntdq" > "avx512bw" > "avx2" > "scalar");
    the scalar path comes with a one-line note."""
    supported = supported_paths()
    requested = requested or os.environ.get("LOWBIT_XNOR_ISA")
    if requested:
        if requested not in supported:
            raise ConfigError(f"XNOR kernel path {requested!r} is not available on this CPU "
                             f"(it supports: {', '.join(supported)})")
        return requested
    if supported[-1] == "scalar":
        warnings.warn("this CPU has no AVX2: the XNOR kernel runs its scalar popcount path",
                      stacklevel=2)
    return supported[-1]


@lru_cache(maxsize=8)
def _path_for(requested: str | None) -> str:
    return kernel_path(requested)


def current_path() -> str:
    """:func:`kernel_path` for the current ``$LOWBIT_XNOR_ISA``, resolved once per value (each
    layer asks on every call)."""
    return _path_for(os.environ.get("LOWBIT_XNOR_ISA"))


def pack_words(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., C]`` -> int64 ``[..., ceil(C / 64)]``, channel c at bit c % 64 of word c // 64."""
    c = bits.shape[-1]
    words = -(-c // 64)
    padded = F.pad(bits.to(torch.int64), (0, words * 64 - c)).reshape(*bits.shape[:-1], words, 64)
    # distinct bits: their sum is their OR, and bit 63 wraps to the sign bit as int64 does
    return (padded << torch.arange(64)).sum(-1)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Float ``[N, C, H, W]`` -> int64 ``[N, H, W, CW]`` sign bits (1 where x >= 0, binarize's +1)."""
    ext = extension()
    if ext is not None:
        return ext.pack_signs(x.float())[0]
    return pack_words(x.permute(0, 2, 3, 1) >= 0)


def pack_weights(w: torch.Tensor) -> torch.Tensor:
    """Weight signs ``[O, C, KH, KW]`` -> int64 ``[O, KWp]`` rows, tap-major and channel-minor
    (bit ``(ky * KW + kx) * C + c``), the layout of the kernel's im2col rows."""
    return pack_words(w.permute(0, 2, 3, 1).reshape(len(w), -1) >= 0)


def gemm_operands(a: torch.Tensor, k: int):
    """``(rows, masks, valid)`` for :func:`popcount_gemm` from packed rows ``a`` int64 ``[M, KWp]``
    of ``k`` bits each (the kernel reads 8 rows' word w as one load, so rows go word-major)."""
    words = a.shape[1]
    mask = pack_words(torch.ones(1, k, dtype=torch.bool)).expand(len(a), words)
    return a.t().contiguous(), mask.t().contiguous(), torch.full((len(a),), k, dtype=torch.int64)


def popcount_gemm(rows, masks, valid, b: torch.Tensor) -> torch.Tensor:
    """The binary GEMM: ``sum a * w`` over the valid bits of each +-1 row pair -> int32
    ``[M, O]`` (``b``: packed weight rows ``[O, KWp]``; operands from :func:`gemm_operands`)."""
    o, m = len(b), rows.shape[1]
    ext = extension()
    if ext is not None:
        ones, zeros = torch.ones(o), torch.zeros(o)
        out = ext.popcount_gemm(rows, masks, valid, b, ones, torch.ones(m), zeros, m,
                                kernel_path())
        return out.reshape(o, m).t().to(torch.int32)
    same = ~(rows.t().unsqueeze(1) ^ b.unsqueeze(0)) & masks.t().unsqueeze(1)   # [M, O, KWp]
    counts = ((same.unsqueeze(-1) >> torch.arange(64)) & 1).sum((-1, -2))
    return (2 * counts - valid.unsqueeze(1)).to(torch.int32)


class PackedSigns(NamedTuple):
    """A binary convolution's input as the previous convolution's epilogue wrote it: sign words
    ``bits`` int64 ``[N, H, W, ceil(C / 64)]`` of ``x - t`` and ``magnitude`` float ``[N, H, W]``,
    the channel sums of ``|x - t|`` (what :func:`pack_signs` returns); ``shape`` is x's."""
    bits: torch.Tensor
    magnitude: torch.Tensor
    shape: tuple


def binary_conv(layer: nn.Module) -> bool:
    """Whether ``layer`` is a convolution of signs by signs that the kernel computes: an
    :class:`~lowbit.nn.binary.XNORConv2d`, or a BNN convolution (``--method bnn``: binary
    weights and inputs, no scale, no K; its bias, added inside a float convolution's sums, is
    not reproduced bit for bit, so a BNN convolution with a bias stays in float form). Rebuilt
    from a packed file, a BNN convolution holds its decoded +-1 weights behind an identity."""
    if isinstance(layer, XNORConv2d):
        return True
    if not isinstance(layer, QuantConv2d) or not isinstance(layer.input_quantizer, SignActivation):
        return False
    quantizer = layer.weight_quantizer
    return isinstance(quantizer, BinaryWeight) or (
        isinstance(quantizer, nn.Identity) and bool((layer.weight.abs() == 1).all()))


class XNORPopcountConv2d(nn.Module):
    """A binary convolution (:func:`binary_conv`) deployed: packed weight signs, per-filter
    alpha (1 for BNN), and the XNOR-popcount kernel. After :func:`fuse_epilogues` it may also apply the BatchNorm
    that followed it (:meth:`fuse_batchnorm`), add a residual (``forward``'s second input) and
    return its output as :class:`PackedSigns` for the next binary convolutions (``emits``:
    "float", "signs" or "both", a ``(float, signs)`` pair)."""

    def __init__(self, layer: QuantConv2d):
        super().__init__()
        w = layer.weight.detach()
        if layer.groups != 1 or layer.dilation != (1, 1) or isinstance(layer.padding, str) \
                or layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1]:
            raise ValueError("the XNOR kernel takes square stride / padding, groups 1, "
                             "dilation 1")
        xnor = isinstance(layer, XNORConv2d)
        if not xnor and layer.bias is not None:
            raise ValueError("a BNN convolution's bias is added inside its float sums")
        self.out_channels, self.in_channels = w.shape[:2]
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, \
            layer.padding
        alpha, signs = (t.detach() for t in layer.binary_factors()) if xnor else \
            (torch.ones(len(w)), binarize(w))
        self.register_buffer("packed", pack_weights(signs))
        self.register_buffer("signs", signs)
        self.register_buffer("alpha", alpha.reshape(-1).float())
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(len(w))
        self.register_buffer("bias", bias.float())
        threshold = layer.input_quantizer.threshold  # RSign's, subtracted as the layer does
        self.register_buffer("threshold", None if threshold is None else
                             threshold.detach().float().reshape(1, -1, 1, 1))
        # the fused epilogue (fuse_epilogues)
        self.batchnorm: nn.Module | None = None
        self.register_buffer("bn_scale", None)
        self.register_buffer("bn_shift", None)
        self.input_scale = xnor and layer.input_scale  # XNOR-Net's K (else K = 1, exact)
        self.emits = "float"
        self.next_scale = True  # whether the consumers use K, so need the channel sums of |.|
        self.register_buffer("next_threshold", None)  # the consumers' RSign threshold [O]
        self._native = None  # the compiled layer (_kernel_layer)

    def fuse_batchnorm(self, bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor):
        """Apply ``bn`` (eval) in the epilogue as ``fma(y, scale, shift)`` (:func:`bn_terms`)."""
        self.batchnorm, self.bn_scale, self.bn_shift = bn, scale, shift
        self._native = None

    def emit(self, emits: str, next_threshold: torch.Tensor | None = None,
             next_scale: bool = True):
        """Return the output as "float", "signs" (:class:`PackedSigns` of ``y - next_threshold``,
        with the channel sums of ``|.|`` where the consumers use K: ``next_scale``) or "both"."""
        self.emits, self.next_threshold, self.next_scale = emits, next_threshold, next_scale
        self._native = None

    def __getstate__(self):
        return {**super().__getstate__(), "_native": None}  # the kernel's object is rebuilt

    def _kernel_layer(self, ext):
        """The compiled layer (weights, epilogue, border masks and scratch), made on first use."""
        if self._native is None:
            threshold = None if self.threshold is None else self.threshold.reshape(-1)
            self._native = ext.Conv(self.packed, self.alpha, self.bias, threshold,
                                    self.in_channels, *self.kernel_size, self.stride[0],
                                    self.padding[0], self.bn_scale, self.bn_shift,
                                    self.next_threshold, self.input_scale)
        return self._native

    def forward(self, x, residual: torch.Tensor | None = None):
        ext = extension()
        if ext is None:
            return self._torch_forward(x, residual)
        if isinstance(x, PackedSigns):  # the producer subtracted this layer's threshold
            inputs = (None, x.bits, x.magnitude, list(x.shape))
        else:
            inputs = (x.float(), None, None, [])
        if residual is not None and residual.shape[2:] != self._output_size(x):
            # a broadcast residual: the float add outside the kernel, then the signs packed
            out, _, _ = self._kernel_layer(ext).run(*inputs, None, True, False, False,
                                                    current_path())
            return self._emit(out + residual)
        out, bits, magnitude = self._kernel_layer(ext).run(
            *inputs, residual, self.emits != "signs", self.emits != "float", self.next_scale,
            current_path())
        if self.emits == "float":
            return out
        n, oh, ow, _ = bits.shape
        signs = PackedSigns(bits, magnitude, (n, self.out_channels, oh, ow))
        return signs if self.emits == "signs" else (out, signs)

    def _output_size(self, x) -> tuple:
        h, w = x.shape[2:]
        return tuple((size + 2 * self.padding[0] - k) // self.stride[0] + 1
                     for size, k in ((h, self.kernel_size[0]), (w, self.kernel_size[1])))

    def _emit(self, y: torch.Tensor):
        """``y`` as ``emits`` asks, the signs packed from the float (no fused epilogue)."""
        if self.emits == "float":
            return y
        signs = PackedSigns(*extension().pack_signs(y, self.next_threshold), tuple(y.shape))
        return signs if self.emits == "signs" else (y, signs)

    def _torch_forward(self, x, residual):
        """The pure-torch path: the same numbers from float ops (signs passed as floats)."""
        if self.threshold is not None:
            x = x - self.threshold
        dot = F.conv2d(binarize(x), self.signs, None, self.stride, self.padding)
        y = dot * self.alpha.reshape(1, -1, 1, 1)
        if self.input_scale:
            y = y * xnor_input_scale(x, self.kernel_size, self.stride, self.padding)
        y = y + self.bias.reshape(1, -1, 1, 1)
        if self.batchnorm is not None:
            y = self.batchnorm(y)
        if residual is not None:
            y = y + residual
        # a consumer on this path takes the float and subtracts its own threshold
        return (y, y) if self.emits == "both" else y


def bn_terms(bn: nn.Module):
    """``(scale, shift)`` with ``bn(y) == fma(y, scale, shift)`` bit for bit, or None where ``bn``
    is not an eval ``BatchNorm2d`` with running statistics or this build's ATen rounds its
    BatchNorm otherwise (checked on probe tensors through both of its CPU loops: a spatial plane
    with a vector tail, and 1 x 1 planes)."""
    ext = extension()
    if ext is None or type(bn) is not nn.BatchNorm2d or bn.training \
            or bn.running_mean is None:
        return None
    weight = None if bn.weight is None else bn.weight.detach().float().contiguous()
    bias = None if bn.bias is None else bn.bias.detach().float().contiguous()
    scale, shift = ext.bn_affine(bn.running_mean, bn.running_var, weight, bias, bn.eps)
    g = torch.Generator().manual_seed(0)
    for shape in ((2, bn.num_features, 5, 7), (3, bn.num_features, 1, 1)):
        probe = torch.randn(shape, generator=g) * 4
        with torch.no_grad():
            if not torch.equal(ext.affine(probe, scale, shift), bn(probe)):
                return None
    return scale, shift
class FrozenWeight(nn.Module):
    """A weight quantizer replaced by its output. The 8-bit first / last layers of an XNOR
    network quantize the same constant weight on every call, and a min-max observer refits its
    range each time (at batch 1 that was a quarter of the deployed network's time); the frozen
    tensor is the quantizer's own output, so the values are unchanged."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return self.weight


def deploy_xnor(model: nn.Module, fuse: bool = True) -> nn.Module:
    """A copy of an XNOR-Net or BNN model (``lowbit train --method xnor`` / ``bnn``) whose binary
    convolutions (:func:`binary_conv`) run the popcount kernel and whose other quantized layers
    keep their quantized weights frozen
    (:class:`FrozenWeight`); a traced model (``fx.GraphModule``, as lowbit's binary methods make
    it) also has each convolution's BatchNorm, residual add and next binary input fused into the
    kernel (:func:`fuse_epilogues`; ``fuse=False`` leaves them as separate modules). A binary
    convolution the kernel does not take (grouped, dilated, rectangular stride, a BNN bias)
    stays in its float form, with a warning."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if binary_conv(module):
            try:
                deployed = XNORPopcountConv2d(module)
            except ValueError as e:
                warnings.warn(f"{name} stays in float binary form: {e}", stacklevel=2)
                continue
            setattr(model.get_submodule(parent) if parent else model, child, deployed)
        elif isinstance(module, QUANT_LAYERS):
            with torch.no_grad():
                module.weight_quantizer = FrozenWeight(module.quantized_weight().detach().clone())
    if fuse and isinstance(model, fx.GraphModule) and extension() is not None:
        fuse_epilogues(model)
    return model


def fuse_epilogues(model: fx.GraphModule) -> fx.GraphModule:
    """Fuse into each popcount convolution (called once in the graph) what follows it, in
    place: the eval BatchNorm that is its only user (where :func:`bn_terms` matches ATen), then
    an add that is the only user of the result (the other operand becomes the residual input,
    and the fused call moves to the add's place, where both exist); then, where the result is
    the input of popcount convolutions with one threshold among them, it is emitted as their
    packed signs (:class:`PackedSigns`), and as a float too where anything else reads it."""
    graph, modules = model.graph, dict(model.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def conv_of(node):
        layer = modules.get(node.target) if node.op == "call_module" else None
        return layer if isinstance(layer, XNORPopcountConv2d) and calls[node.target] == 1 \
            else None

    for node in list(graph.nodes):
        conv = conv_of(node)
        if conv is None:
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and len(users[0].args) == 1:
            terms = bn_terms(modules[users[0].target])
            if terms is not None:
                conv.fuse_batchnorm(modules[users[0].target], *terms)
                users[0].replace_all_uses_with(node)
                graph.erase_node(users[0])
        users = list(node.users)
        add = users[0] if len(users) == 1 else None
        if add is not None and add.op == "call_function" and add.target in (operator.add,
                                                                             torch.add) \
                and len(add.args) == 2 and not add.kwargs:
            other = add.args[1] if add.args[0] is node else add.args[0]
            if isinstance(other, fx.Node) and other is not node:
                with graph.inserting_before(add):
                    fused = graph.call_module(node.target, (node.args[0], other))
                add.replace_all_uses_with(fused)
                graph.erase_node(add)
                graph.erase_node(node)
                node = fused
        _emit_signs(graph, node, conv, conv_of)
    graph.lint()
    model.recompile()
    return model


def _emit_signs(graph: fx.Graph, node: fx.Node, conv: XNORPopcountConv2d, conv_of) -> None:
    """Let ``node``'s output reach the popcount convolutions that take it as their input as
    packed signs, and everything else as a float."""
    consumers = [u for u in node.users if conv_of(u) is not None and u.args[0] is node]
    thresholds = [conv_of(u).threshold for u in consumers]
    if not consumers or any((t is None) != (thresholds[0] is None) or
                            (t is not None and not torch.equal(t, thresholds[0]))
                            for t in thresholds):
        return
    others = [u for u in node.users if u not in consumers or
              node in u.args[1:] or node in u.kwargs.values()]
    conv.emit("both" if others else "signs",
              None if thresholds[0] is None else thresholds[0].reshape(-1).clone(),
              any(conv_of(u).input_scale for u in consumers))
    if not others:
        return
    with graph.inserting_after(node):
        floats = graph.call_function(operator.getitem, (node, 0))
    with graph.inserting_after(floats):
        signs = graph.call_function(operator.getitem, (node, 1))
    for user in list(node.users):
        if user in (floats, signs):
            continue
        to_float = lambda a: floats if a is node else a  # noqa: E731
        args = fx.node.map_arg(user.args, to_float)
        if user in consumers:
            args = (signs, *args[1:])
        user.args, user.kwargs = args, fx.node.map_arg(user.kwargs, to_float)
