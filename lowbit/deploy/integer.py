"""The integer-only reference engine: what a device computes from a quantized CNN.

After the network's input quantizer (the one float step: ``q = clamp(round(x/S) + Z)``), every
value is an integer tensor ``q`` standing for the real ``S * (q - Z)`` with a per-tensor scale
``S`` and zero point ``Z``. Each Conv / Linear computes (Jacob et al. 2018, eq. 7)::

    acc = sum (q_W - Z_W) * (q_X - Z_X) + q_b        int32, at scale S_W * S_X (per channel)
    q_b = round(b / (S_W * S_X))                     the bias as int32 at the accumulator scale

and the accumulator is brought to its consumer's scale by a fixed-point multiplier
``M = S_acc / S_out = M0 * 2^-(31 + n)`` with ``M0`` an int32 in ``[2^30, 2^31)`` (i.e.
``M0 / 2^31`` in [0.5, 1)) and a shift ``n``: ``q_out = Z_out + round(acc * M)``, computed as
``(acc * M0 + 2^(30 + n)) >> (31 + n)`` in int64 (one rounding, half up).

Where an output goes only (through a ReLU) into quantized Conv / Linear inputs with one set of
qparams, it is requantized straight to them and the ReLU is a clamp at ``Z_out``. Where it also
feeds a residual add (the simulation keeps that path in float), it becomes an int32 "residual
stream" with zero point 0 whose scale is fixed ahead of time, as a compiler would:
``S = S_next / 2^STREAM_FRACTION_BITS``, ``S_next`` the finest input scale among the quantized
layers the stream reaches, so the stream is ``2^16`` times finer than any rounding made from it
and holds values up to ``2^15`` of those steps (an overflow is reported, never wrapped). A stream
that reaches no quantized layer takes its scale from a worst-case bound instead, ``S = R / 2^29``
with ``R`` the largest real value it can hold. Adds rescale both operands to the sum's scale by
fixed-point multipliers; global average pooling sums (in int64: up to 2^31 times H*W pixels) and
multiplies by ``1 / (H*W)`` the same way; slicing and padding act on the integers (padding with
``Z``). The last layer's accumulator is the output, dequantized once.

Where simulation and engine can differ (``docs``: every one is below half an output step):

* The simulation sums ``S_W (q_W - Z_W) * S_X (q_X - Z_X)`` in float32, so its pre-rounding value
  carries float32 error; the engine's sum is exact.
* Rounding: the simulation rounds ``y * (1/S)`` half to even in float32; the engine rounds
  ``acc * M`` half up with ``M`` held to 31 bits. Values within about 2^-24 of a half step can
  round the other way.
* The bias is rounded to the accumulator grid; ``lowbit.quantize`` does the same in the
  simulation (``int_bias``), otherwise the two differ by up to half a step of ``S_W * S_X``.
* The residual stream has a finite step (``2^-16`` of the next rounding step), where the
  simulation's float path has none.
* Zero points are subtracted before the products (the device's offset trick gives the same
  integers), and zero padding pads with ``Z_X``, which is real zero, as in the simulation.

PyTorch has no int32 convolution on the CPU, so the integer products are summed by a float
convolution of the integer tensors: float32 where the layer's worst-case sum is below 2^24
(every partial sum is then an exactly representable integer, in any summation order), float64
otherwise (exact below 2^53, which int32 accumulators guarantee; the engine checks that every
accumulator fits in int32).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.errors import ConfigError, ModelError, NumericalError
from lowbit.nn.layers import QUANT_LAYERS, QuantConv2d
from lowbit.nn.accumulator import weight_scale
from lowbit.nn.quantizer import AffineQuantizer, affine_part
from lowbit.quant.affine import broadcast_along
from lowbit.transforms.fold import trace

STREAM_BITS = 29  # a bound-scaled stream stays below 2^29: the sum of two still fits in int32
STREAM_FRACTION_BITS = 16
INT32 = 2 ** 31

_RELU_FUNCTIONS = {F.relu, torch.relu}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}


@dataclass
class QTensor:
    """Integers ``data`` (int64 holding int32 values) standing for ``scale * (data - zero_point)``;
    ``bound`` is the largest ``|data - zero_point|`` the tensor can hold (fixed ahead of time)."""

    data: torch.Tensor
    scale: float
    zero_point: int
    bound: int

    def like(self, data: torch.Tensor) -> "QTensor":
        """The same qparams on other integers (a shape operation, a ReLU)."""
        return QTensor(data, self.scale, self.zero_point, self.bound)

    def dequantize(self) -> torch.Tensor:
        return ((self.data - self.zero_point).double() * self.scale).float()


def fixed_point(multiplier) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M0, n)`` with ``M = M0 * 2^-(31 + n)``, ``M0`` in ``[2^30, 2^31)`` (Jacob et al. 2018,
    eq. 6: ``M = 2^-n * M0/2^31`` with ``M0/2^31`` in [0.5, 1)); ``n`` is negative for M >= 1."""
    mantissa, exponent = torch.frexp(torch.as_tensor(multiplier, dtype=torch.float64))
    m0 = torch.round(mantissa * INT32).to(torch.int64)
    carry = m0 == INT32
    m0 = torch.where(carry, m0 // 2, m0)
    shift = -(exponent.to(torch.int64) + carry.to(torch.int64))
    if bool((shift <= -31).any()) or bool((shift >= 31).any()):
        raise NumericalError(f"requantization multiplier {multiplier} is outside what a 31-bit "
                             "fixed-point multiplier with a shift can hold")
    return m0, shift


def multiply_by_fixed_point(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor):
    """``round(acc * M)`` half up, in int64: ``(acc * M0 + 2^(30 + n)) >> (31 + n)``."""
    total = 31 + shift
    return torch.bitwise_right_shift(acc * m0 + torch.bitwise_left_shift(torch.ones_like(total),
                                                                         total - 1), total)


def _check_int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and (int(t.max()) >= INT32 or int(t.min()) < -INT32):
        raise NumericalError(f"{what}: an int32 accumulator overflows (the engine would wrap)")
    return t


@dataclass
class _Quant:
    """Per-tensor integer qparams of a layer input."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def bound(self) -> int:
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))


def _input_qparams(layer, name: str) -> _Quant:
    q = layer.input_quantizer
    if not isinstance(q, AffineQuantizer):
        raise ConfigError(f"{name}: its input is not quantized ({type(q).__name__}); the integer "
                          "engine needs every Conv / Linear input quantized (set a_bits)")
    if not q.calibrated:
        raise ConfigError(f"{name}: the input quantizer was never calibrated")
    if q.scale.dim():
        raise ConfigError(f"{name}: per-channel activation scales cannot be taken out of an "
                          "integer dot product; quantize with a_per_channel: false")
    return _Quant(float(q.scale), int(q.zero_point), int(q.quant_min), int(q.quant_max))


def integer_weight(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_W - Z_W as int64, per-output-channel scale as float64)`` of a quantized layer; a
    bias-correction gain is a per-channel factor, folded into the scale."""
    slot = layer.weight_quantizer
    q = affine_part(slot)
    if q is None:
        raise ConfigError(f"{name}: {type(slot).__name__} weights are not affine integer codes")
    if not q.calibrated:
        raise ConfigError(f"{name}: the weight quantizer was never calibrated")
    w = layer.weight.detach()
    integers = (q.codes(w) - broadcast_along(q.zero_point, w, q.axis if q.scale.dim() else None)
                ).to(torch.int64)
    scale = weight_scale(layer)
    if scale is None:  # calibrated affine codes, so: a per-channel shift
        raise ConfigError(f"{name}: Banner's weight bias correction (mean or mean_std) shifts "
                          "every weight of a channel by a float; an integer engine cannot store "
                          "that. Use empirical_bias_correction (it moves only the bias)")
    return integers, scale


class IntegerEngine:
    """Runs a quantized model (from :func:`lowbit.quantize`) with integer arithmetic only.

    ``engine(x)`` returns float logits (the last accumulator, dequantized); ``engine.run(x)``
    returns them as a :class:`QTensor`.
    """

    def __init__(self, qmodel: nn.Module):
        traced, reason = trace(qmodel)
        if traced is None:
            raise ModelError(f"the integer engine needs a traceable model: {reason}")
        self.graph = traced.graph
        self.modules = dict(traced.named_modules())
        self.layers = {}
        for node in self.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], QUANT_LAYERS):
                layer = self.modules[node.target]
                w, s_w = integer_weight(layer, node.target)
                qx = _input_qparams(layer, node.target)
                worst = int(w.abs().reshape(len(w), -1).sum(1).max()) * qx.bound
                dtype = torch.float32 if worst < 2 ** 24 else torch.float64
                self.layers[node.target] = (layer, qx, w.to(dtype), s_w)
        if not self.layers:
            raise ModelError("the model has no quantized Conv / Linear layer")
        self.targets = {node: self._direct_target(node) for node in self.graph.nodes
                        if node.op == "call_module" and node.target in self.layers}
        self.stream_scales = {node: self._stream_scale(node) for node in self.graph.nodes}

    def _stream_scale(self, node) -> float | None:
        """``min S_next / 2^16`` over the quantized layers ``node``'s value reaches (None if it
        reaches none)."""
        seen, frontier, scales = set(), list(node.users), []
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module" and user.target in self.layers:
                scales.append(self.layers[user.target][1].scale)
            else:
                frontier.extend(user.users)
        return min(scales) / 2 ** STREAM_FRACTION_BITS if scales else None

    def _consumer_qparams(self, node) -> _Quant | None:
        """The one input qparams shared by all of ``node``'s users, if all are quantized layers."""
        found = []
        for user in node.users:
            if not (user.op == "call_module" and user.target in self.layers):
                return None
            found.append(self.layers[user.target][1])
        return found[0] if found and all(f == found[0] for f in found) else None

    def _direct_target(self, node) -> tuple[_Quant, bool] | None:
        """(qparams, through a ReLU) when ``node``'s output can be requantized straight to its
        consumers' input qparams; None when it must stay an int32 stream."""
        users = list(node.users)
        if len(users) == 1 and self._is_relu(users[0]):
            target = self._consumer_qparams(users[0])
            return (target, True) if target else None
        target = self._consumer_qparams(node)
        return (target, False) if target else None

    def _is_relu(self, node) -> bool:
        return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ("relu", "relu_")) or \
            (node.op == "call_module" and isinstance(self.modules[node.target], nn.ReLU))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).dequantize()

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> QTensor:
        env: dict = {}
        value = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                out = value(node.args[0])
                if not isinstance(out, QTensor):
                    raise ModelError("the model's output is not computed by a quantized layer")
                return out
            elif node.op == "call_module" and node.target in self.layers:
                env[node] = self._layer(node, value(node.args[0]))
            else:
                env[node] = self._op(node, [value(a) for a in node.args])
        raise ModelError("the traced graph has no output")

    def _layer(self, node, v) -> QTensor:
        layer, qx, w, s_w = self.layers[node.target]
        if isinstance(v, QTensor):
            x_int = _requantize_to(v, qx) - qx.zero_point
        else:  # the network input: the engine's one float step
            x_int = torch.clamp(torch.round(v * (1.0 / torch.tensor(qx.scale))) + qx.zero_point,
                                qx.qmin, qx.qmax).to(torch.int64) - qx.zero_point
        s_acc = s_w * qx.scale
        if isinstance(layer, QuantConv2d):
            acc = layer._conv_forward(x_int.to(w.dtype), w, None)
            col = (-1, 1, 1)
        else:
            acc = F.linear(x_int.to(w.dtype), w)
            col = (-1,)
        acc = acc.round().to(torch.int64)
        bias = torch.zeros(len(s_acc), dtype=torch.int64)
        if layer.bias is not None:
            bias = torch.round(layer.bias.detach().double() / s_acc).to(torch.int64)
            acc = acc + bias.reshape(col)
        acc = _check_int32(acc, node.target)
        target = self.targets[node]
        if target is None:  # an int32 stream
            scale = self.stream_scales[node]
            if scale is None:  # reaches no quantized layer: from the accumulator's worst case
                worst = w.abs().reshape(len(w), -1).sum(1) * qx.bound + bias.abs()
                scale = float((worst.double() * s_acc).max()) / 2 ** STREAM_BITS
            m0, shift = fixed_point(s_acc / scale)
            data = multiply_by_fixed_point(acc, m0.reshape(col), shift.reshape(col))
            return QTensor(_check_int32(data, node.target), scale, 0, INT32)
        q, relu = target
        m0, shift = fixed_point(s_acc / q.scale)
        data = multiply_by_fixed_point(acc, m0.reshape(col), shift.reshape(col)) + q.zero_point
        data = data.clamp(q.zero_point if relu else q.qmin, q.qmax)
        return QTensor(data, q.scale, q.zero_point, q.bound)

    def _op(self, node, args):
        """Every non-layer node: ReLU, add, pooling and shape operations on integers. Nodes
        before the first quantizer (only float inputs) run in float: input preprocessing."""
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if not any(isinstance(a, QTensor) for a in args):
            fn = module if module is not None else (
                node.target if node.op == "call_function"
                else lambda x, *rest, **kw: getattr(x, node.target)(*rest, **kw))
            return fn(*args, **node.kwargs)
        if isinstance(module, nn.Identity) or (node.op == "call_method"
                                               and node.target == "contiguous"):
            return args[0]
        if self._is_relu(node):
            return args[0].like(args[0].data.clamp(min=args[0].zero_point))
        if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            return _add(*args[:2], node.name, self.stream_scales[node])
        if _is_global_pool(node, module, args):
            v = args[0]
            h, w = v.data.shape[-2:]
            m0, shift = fixed_point(1.0 / (h * w))
            keep = node.op != "call_method" or node.kwargs.get("keepdim", False)
            total = (v.data - v.zero_point).sum((-2, -1), keepdim=bool(keep))
            return QTensor(multiply_by_fixed_point(total, m0, shift), v.scale, 0, v.bound)
        if isinstance(module, nn.MaxPool2d):
            return args[0].like(module(args[0].data.double()).to(torch.int64))
        if node.op == "call_function" and node.target is F.pad:
            v, pad = args[0], args[1]
            return v.like(F.pad(v.data, pad, value=v.zero_point))
        if node.op == "call_function" and node.target is operator.getitem:
            return args[0].like(args[0].data[args[1]])
        if (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
                (node.op == "call_function" and node.target is torch.flatten) or \
                isinstance(module, nn.Flatten):
            v = args[0]
            if isinstance(module, nn.Flatten):
                data = module(v.data)
            elif node.op == "call_function":
                data = torch.flatten(v.data, *args[1:], **node.kwargs)
            else:
                data = getattr(v.data, node.target)(*args[1:], **node.kwargs)
            return v.like(data)
        what = type(module).__name__ if module is not None else \
            getattr(node.target, "__name__", str(node.target))
        raise ModelError(f"{node.name}: the integer engine has no integer form of {what}")


def _is_global_pool(node, module, args) -> bool:
    """Global average pooling: ``adaptive_avg_pool2d(x, 1)`` (function or module) or
    ``x.mean((2, 3))``."""
    if node.op == "call_method" and node.target == "mean":
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) in ((2, 3), (-2, -1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else node.kwargs.get("output_size")
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
    else:
        return False
    if size not in (1, (1, 1), [1, 1]):
        raise ModelError(f"{node.name}: adaptive average pooling to {size} has no integer form "
                         "in the engine (global pooling only)")
    return True


def _requantize_to(v: QTensor, q: _Quant) -> torch.Tensor:
    """``v``'s integers on a layer input's grid: ``clamp(Z + round((v - Z_v) * S_v / S))``."""
    if v.scale == q.scale and v.zero_point == q.zero_point and \
            int(v.data.min()) >= q.qmin and int(v.data.max()) <= q.qmax:
        return v.data
    m0, shift = fixed_point(v.scale / q.scale)
    data = multiply_by_fixed_point(v.data - v.zero_point, m0, shift) + q.zero_point
    return data.clamp(q.qmin, q.qmax)


def _add(a: QTensor, b: QTensor, name: str, scale: float | None) -> QTensor:
    """``a + b`` as a stream at ``scale``, or, if None, at ``(R_a + R_b) / 2^29`` with
    ``R = S * bound`` (zero point 0)."""
    if not (isinstance(a, QTensor) and isinstance(b, QTensor)):
        raise ModelError(f"{name}: the integer engine adds two quantized tensors only")
    bound = INT32
    if scale is None:
        scale, bound = (a.scale * a.bound + b.scale * b.bound) / 2 ** STREAM_BITS, 2 ** STREAM_BITS
    total = 0
    for v in (a, b):
        m0, shift = fixed_point(v.scale / scale)
        total = total + multiply_by_fixed_point(v.data - v.zero_point, m0, shift)
    return QTensor(_check_int32(total, name), scale, 0, bound)
