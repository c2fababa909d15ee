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
"""
from __future__ import annotations

import copy
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import ConfigError
from lowbit.nn.binary import XNORConv2d
from lowbit.nn.layers import QUANT_LAYERS
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


class XNORPopcountConv2d(nn.Module):
    """An :class:`~lowbit.nn.binary.XNORConv2d` deployed: packed weight signs, per-filter alpha,
    and the XNOR-popcount kernel."""

    def __init__(self, layer: XNORConv2d):
        super().__init__()
        w = layer.weight.detach()
        if layer.groups != 1 or layer.dilation != (1, 1) or isinstance(layer.padding, str) \
                or layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1]:
            raise ValueError("the XNOR kernel takes square stride / padding, groups 1, "
                             "dilation 1")
        self.in_channels = w.shape[1]
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, \
            layer.padding
        alpha, signs = (t.detach() for t in layer.binary_factors())
        self.register_buffer("packed", pack_weights(signs))
        self.register_buffer("signs", signs)
        self.register_buffer("alpha", alpha.reshape(-1).float())
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros(len(w))
        self.register_buffer("bias", bias.float())
        threshold = layer.input_quantizer.threshold  # RSign's, subtracted as the layer does
        self.register_buffer("threshold", None if threshold is None else
                             threshold.detach().float().reshape(1, -1, 1, 1))
        self._borders = None  # (input shape, masks, valid): they depend only on the geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            x = x - self.threshold
        ext = extension()
        if ext is None:
            k = xnor_input_scale(x, self.kernel_size, self.stride, self.padding)
            dot = F.conv2d(binarize(x), self.signs, None, self.stride, self.padding)
            return dot * self.alpha.reshape(1, -1, 1, 1) * k + self.bias.reshape(1, -1, 1, 1)
        # one pass packs the signs and sums |x| over channels; im2col adds K's box sums
        bits, magnitude = ext.pack_signs(x.float())
        shape = tuple(x.shape)
        known = self._borders is not None and self._borders[0] == shape
        rows, k, *borders = ext.im2col(bits, magnitude, self.in_channels, *self.kernel_size,
                                       self.stride[0], self.padding[0], not known)
        if not known:
            self._borders = (shape, *borders)  # the last geometry only: memory stays bounded
        _, masks, valid = self._borders
        oh = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        ow = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        out = ext.popcount_gemm(rows, masks, valid, self.packed, self.alpha, k, self.bias,
                                oh * ow, kernel_path())
        return out.reshape(len(x), -1, oh, ow)


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


def deploy_xnor(model: nn.Module) -> nn.Module:
    """A copy of an XNOR-Net model (``lowbit train --method xnor``) whose XNOR convolutions run
    the popcount kernel and whose other quantized layers keep their quantized weights frozen
    (:class:`FrozenWeight`); everything else is unchanged. An XNOR convolution the kernel does
    not take (grouped, dilated, rectangular stride) stays in its float form, with a warning."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, XNORConv2d):
            try:
                deployed = XNORPopcountConv2d(module)
            except ValueError as e:
                warnings.warn(f"{name} stays in float XNOR form: {e}", stacklevel=2)
                continue
            setattr(model.get_submodule(parent) if parent else model, child, deployed)
        elif isinstance(module, QUANT_LAYERS):
            with torch.no_grad():
                module.weight_quantizer = FrozenWeight(module.quantized_weight().detach().clone())
    return model
