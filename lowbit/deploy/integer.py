"""The integer-only reference engine: what a device computes from a quantized CNN.

The engine is a translator of a :class:`lowbit.deploy.lowering.Lowering`: one integer kernel per
node kind, reading the grid of every tensor from the lowering (so it quantizes exactly the
tensors the simulation and the ONNX graph quantize). After the network's input quantizer (the
one float step: ``q = clamp(round(x/S) + Z)``), every value is an integer tensor ``q`` standing
for ``S * (q - Z)``. The kernels are those of integer runtimes (TFLite's reference kernels,
gemmlowp):

* **Conv / Linear** (Jacob et al. 2018, eq. 7)::

      acc = sum (q_W - Z_W) * (q_X - Z_X) + q_b        int32, at scale S_W * S_X (per channel)
      q_b = round(b / (S_W * S_X))                     the bias as int32 at the accumulator scale

  brought to the output grid by a fixed-point multiplier ``M = S_acc / S_out = M0 * 2^-(31 + n)``
  with ``M0`` an int32 in ``[2^30, 2^31)`` (``M0 / 2^31`` in [0.5, 1)) and a shift ``n``:
  ``q_out = Z_out + round(acc * M)``, computed as ``acc * M0`` shifted right by ``31 + n`` in
  int64 (one rounding, half to even, as the simulation rounds); a fused ReLU / ReLU6 / clamp is
  the integer clamp of that result.
* **Clamps** on a grid clamp the integers at ``Z + round(lo / S)`` and ``Z + round(hi / S)``.
* **Smooth activations** (Hardswish, Hardsigmoid, Sigmoid, SiLU, GELU, Tanh, LeakyReLU, ELU,
  PReLU, an unfolded batch norm, ``x * c``): a lookup table over the input's codes,
  ``T[k] = clamp(round(f(S_in (k - Z_in)) / S_out) + Z_out)``, one entry per code (256 for 8-bit
  inputs) and per channel where ``f`` depends on the channel (PReLU, batch norm). The table is
  computed with the same float function the simulation runs, so the two agree exactly.
* **Add**: each operand rescaled to ``S_out / 2^24`` by a fixed-point multiplier, summed, and
  shifted down to ``S_out`` with one rounding (TFLite's int32 add keeps ``2^20``; the engine's
  int64 intermediates afford four more bits, so that an operand's rescaling error, at most
  ``2^-25`` of a step, hardly ever moves a sum across a half step). **Mul** (squeeze-excite):
  ``Z_out + round((q_a - Z_a)(q_b - Z_b) * S_a S_b / S_out)``. **Concat**: each input requantized
  to the output grid.
* **Average pooling**: exact integer window sums times ``S_in / (n S_out)`` in fixed point (``n``
  per window where padding is not counted). **Max pooling**, **nearest upsampling**, reshapes,
  slices, chunks and zero padding (with ``Z``) move integers. **Bilinear upsampling** interpolates
  the integers (in float64, exact for the dyadic weights of power-of-two factors) and rounds once.

In the *simulation form* some tensors have no grid (the simulation keeps them in float): where an
output goes only (through a ReLU) into quantized layers with one set of qparams, the lowering
gives it their grid; elsewhere (a residual add and what feeds it) it is an int32 "residual
stream" with zero point 0 whose scale is fixed ahead of time, as a compiler would:
``S = S_next / 2^STREAM_FRACTION_BITS``, ``S_next`` the finest input scale among the quantized
layers the stream reaches, so the stream is ``2^16`` times finer than any rounding made from it
and holds values up to ``2^15`` of those steps (an overflow is reported, never wrapped). A stream
that reaches no quantized layer takes its scale from a worst-case bound instead, ``S = R / 2^29``
with ``R`` the largest real value it can hold. Lookup tables, products and concatenation need
8-bit inputs: build the engine with calibration batches (the fully quantized form) for models
that have them. The last layer's accumulator is the output, dequantized once.

Where simulation and engine can differ (every one is below half an output step):

* The simulation sums ``S_W (q_W - Z_W) * S_X (q_X - Z_X)`` in float32, so its pre-rounding value
  carries float32 error; the engine's sum is exact.
* Rounding: the simulation rounds ``y * (1/S)`` in float32; the engine rounds ``acc * M`` with
  ``M`` held to 31 bits (both half to even). Values within about 2^-24 of a half step can round
  the other way.
* The bias is rounded to the accumulator grid; ``lowbit.quantize`` does the same in the
  simulation (``int_bias``), otherwise the two differ by up to half a step of ``S_W * S_X``.
* The residual stream has a finite step (``2^-16`` of the next rounding step), where the
  simulation's float path has none; so has the add's intermediate sum.
* Bilinear upsampling by 2 puts many values exactly on a half step (weights 1/4 and 3/4): the
  engine rounds those exact ties half to even, the float simulation sees them a float32 error
  away and rounds either way (a few percent of the upsampled values, one step each).
* Zero points are subtracted before the products (the device's offset trick gives the same
  integers), and zero padding pads with ``Z_X``, which is real zero, as in the simulation.

PyTorch has no int32 convolution on the CPU, so the integer products are summed by a float
convolution of the integer tensors: float32 where the layer's worst-case sum is below 2^24
(every partial sum is then an exactly representable integer, in any summation order), float64
otherwise (exact below 2^53, which int32 accumulators guarantee; the engine checks that every
accumulator fits in int32). Pooling sums run the same way in float64.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from lowbit.deploy.lowering import Grid, Lowering, clamp_bounds, lower
from lowbit.errors import ConfigError, ModelError, NumericalError
from lowbit.nn.accumulator import integer_codes, weight_scale
from lowbit.nn.layers import QuantConv2d
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer
from lowbit.quant.affine import broadcast_along, quantize
from lowbit.transforms.ops import adaptive_window

STREAM_BITS = 29  # a bound-scaled stream stays below 2^29: the sum of two still fits in int32
STREAM_FRACTION_BITS = 16
INT32 = 2 ** 31

FINE_BITS = 24  # an add sums its rescaled operands 2^24 times finer than its output step


@dataclass
class QTensor:
    """Integers ``data`` (int64 holding int32 values) standing for ``scale * (data - zero_point)``;
    ``bound`` is the largest ``|data - zero_point|`` the tensor can hold (fixed ahead of time)."""

    data: torch.Tensor
    scale: float
    zero_point: int
    bound: int
    grid: Grid | None = None  # the grid it lies on; None for an int32 stream

    @classmethod
    def on(cls, data: torch.Tensor, grid: Grid) -> "QTensor":
        return cls(data, grid.scale, grid.zero_point, grid.bound, grid)

    def like(self, data: torch.Tensor) -> "QTensor":
        """The same qparams on other integers (a shape operation, a ReLU)."""
        return QTensor(data, self.scale, self.zero_point, self.bound, self.grid)

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
    """``round(acc * M)`` half to even, in int64: ``acc * M0`` shifted right by ``31 + n``."""
    return round_shift(acc * m0, 31 + shift)


def round_shift(x: torch.Tensor, bits) -> torch.Tensor:
    """``round(x / 2^bits)`` half to even (``bits >= 1``), in int64: the floor shift, plus one
    where the remainder is above half, or exactly half and the floor odd. Half to even is how
    the simulation (``torch.round``) and ONNX's QuantizeLinear round; TFLite rounds half away
    from zero. Only exact ties tell them apart, and a fixed-point product meets them where ``M``
    has few bits: an average pool over 2^k values onto its input's grid, say."""
    bits = torch.as_tensor(bits, dtype=torch.int64)
    floor = torch.bitwise_right_shift(x, bits)
    rest = x - torch.bitwise_left_shift(floor, bits)
    half = torch.bitwise_left_shift(torch.ones_like(bits), bits - 1)
    return floor + ((rest > half) | ((rest == half) & (floor % 2 == 1))).to(torch.int64)


def _check_int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and (int(t.max()) >= INT32 or int(t.min()) < -INT32):
        raise NumericalError(f"{what}: an int32 accumulator overflows (the engine would wrap)")
    return t


def input_grid(layer, name: str) -> Grid:
    q = layer.input_quantizer
    if integer_codes(q) is None:
        if isinstance(q, (AffineQuantizer, LSQQuantizer)):
            raise ConfigError(f"{name}: the input quantizer was never calibrated")
        raise ConfigError(f"{name}: its input is not quantized ({type(q).__name__}); the integer "
                          "engine needs every Conv / Linear input quantized (set a_bits)")
    grid = Grid.of(q)
    if grid is None:
        raise ConfigError(f"{name}: per-channel activation scales cannot be taken out of an "
                          "integer dot product; quantize with a_per_channel: false")
    return grid


def integer_weight(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_W - Z_W as int64, per-output-channel scale as float64)`` of a quantized layer; a
    bias-correction gain is a per-channel factor, folded into the scale."""
    slot = layer.weight_quantizer
    q = integer_codes(slot, layer.weight)
    if q is None:
        inner = slot.quantizer if isinstance(slot, CorrectedQuantizer) else slot
        if isinstance(inner, (AffineQuantizer, LSQQuantizer)):
            raise ConfigError(f"{name}: the weight quantizer was never calibrated")
        raise ConfigError(f"{name}: {type(slot).__name__} weights are not affine integer codes")
    w = layer.weight.detach()
    integers = (q.codes(w) - broadcast_along(q.zero_point, w, q.axis)).to(torch.int64)
    scale = weight_scale(layer)
    if scale is None:  # calibrated affine codes, so: a per-channel shift
        raise ConfigError(f"{name}: Banner's weight bias correction (mean or mean_std) shifts "
                          "every weight of a channel by a float; an integer engine cannot store "
                          "that. Use empirical_bias_correction (it moves only the bias)")
    return integers, scale


class IntegerEngine:
    """Runs a quantized model (from :func:`lowbit.quantize`) with integer arithmetic only.

    ``IntegerEngine(qmodel)`` runs the simulation form (residual paths as int32 streams);
    ``IntegerEngine(qmodel, calib)`` the fully quantized form (every tensor an ``act_bits``
    integer), which models with smooth activations, products or concatenation need. A
    :class:`~lowbit.deploy.lowering.Lowering` may be passed instead of the model, so the engine,
    the simulation and the ONNX graph share one. ``engine(x)`` returns float logits (the last
    accumulator, dequantized); ``engine.run(x)`` returns them as a :class:`QTensor`.
    ``engine.fused`` maps each node to the clamp it writes through.
    """

    def __init__(self, qmodel: nn.Module | Lowering, calib=None, act_bits: int = 8):
        self.lowering = lower(qmodel, calib, act_bits)
        graph_module = self.lowering.graph_module
        self.graph, self.modules = graph_module.graph, self.lowering.modules
        self.kinds = self.lowering.kinds
        self.fused = self.lowering.fused
        self.clamps = set(self.fused.values())
        self.layers, self.tables = {}, {}
        for node in self.graph.nodes:
            if self.kinds[node] == "layer":
                layer = self.modules[node.target]
                w, s_w = integer_weight(layer, node.target)
                qx = input_grid(layer, node.target)
                worst = int(w.abs().reshape(len(w), -1).sum(1).max()) * qx.bound
                dtype = torch.float32 if worst < 2 ** 24 else torch.float64
                self.layers[node] = (layer, qx, w.to(dtype), s_w)
        if not self.layers:
            raise ModelError("the model has no quantized Conv / Linear layer")
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
            if user in self.layers:
                scales.append(self.layers[user][1].scale)
            else:
                frontier.extend(user.users)
        return min(scales) / 2 ** STREAM_FRACTION_BITS if scales else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).dequantize()

    @torch.no_grad()
    def run(self, x: torch.Tensor, values: dict | None = None) -> QTensor:
        """The output as a :class:`QTensor`; ``values``, if given, receives every node's value
        (to inspect or test one kernel at a time)."""
        env: dict = {} if values is None else values
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = operator.attrgetter(node.target)(self.lowering.graph_module)
            elif node.op == "output":
                out = env[node.args[0]]
                if not isinstance(out, QTensor):
                    raise ModelError("the model's output is not computed by a quantized layer")
                return out
            else:
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = self._node(node, args, kwargs)
        raise ModelError("the traced graph has no output")

    def _node(self, node, args, kwargs):
        """One node: float before the first quantizer (input preprocessing), else the integer
        kernel of its kind."""
        if node in self.layers:
            return self._layer(node, args, kwargs)
        if not _holds_qtensor((args, kwargs)):
            return self._call(node, args, kwargs)
        kind = self.kinds[node]
        if kind == "meta":
            return self._call(node, *_integers((args, kwargs)))
        kernel = getattr(self, f"_{kind}", None) if kind else None
        if kernel is None:
            raise ModelError(f"{node.name}: the integer engine has no integer form of "
                             f"{_what(node, self.modules)}")
        return kernel(node, args, kwargs)

    def _module(self, node) -> nn.Module | None:
        return self.modules[node.target] if node.op == "call_module" else None

    def _call(self, node, args, kwargs):
        """The node's own float operation on ``args``."""
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _needs_grid(self, node, *values) -> Grid:
        """The output grid of ``node``, whose inputs ``values`` must lie on grids."""
        grid = self.lowering.output_grid(node)
        if grid is None or any(v.grid is None for v in values):
            raise ModelError(f"{node.name}: {_what(node, self.modules)} needs 8-bit integer "
                             "inputs and output; build the engine with calibration batches "
                             "(IntegerEngine(qmodel, calib)) for the fully quantized form")
        return grid

    def _bounds(self, node, grid: Grid) -> tuple[int, int]:
        """The integer bounds of ``node``'s output: its fused clamp's, else the grid's."""
        clamp = self.fused.get(node)
        if clamp is None:
            return grid.qmin, grid.qmax
        lo, hi = clamp_bounds(clamp, self._module(clamp))
        return grid.code(lo), grid.code(hi)

    def _layer(self, node, args, kwargs) -> QTensor:
        layer, qx, w, s_w = self.layers[node]
        v = args[0]
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
        grid = self.lowering.output_grid(node)
        if grid is None:  # an int32 stream
            scale = self.stream_scales[node]
            if scale is None:  # reaches no quantized layer: from the accumulator's worst case
                worst = w.abs().reshape(len(w), -1).sum(1) * qx.bound + bias.abs()
                scale = float((worst.double() * s_acc).max()) / 2 ** STREAM_BITS
            m0, shift = fixed_point(s_acc / scale)
            data = multiply_by_fixed_point(acc, m0.reshape(col), shift.reshape(col))
            return QTensor(_check_int32(data, node.target), scale, 0, INT32)
        m0, shift = fixed_point(s_acc / grid.scale)
        data = multiply_by_fixed_point(acc, m0.reshape(col), shift.reshape(col)) + grid.zero_point
        return QTensor.on(data.clamp(*self._bounds(node, grid)), grid)

    def _clamp(self, node, args, kwargs) -> QTensor:
        v = args[0]
        if node in self.clamps:  # fused: its producer already wrote the clamped integers
            return v
        lo, hi = clamp_bounds(node, self._module(node))
        grid = v.grid or Grid(v.scale, 0, -INT32, INT32 - 1)
        return v.like(v.data.clamp(grid.code(lo), grid.code(hi)))

    def _lut(self, node, args, kwargs) -> QTensor:
        v = next(a for a in args if isinstance(a, QTensor))
        grid = self._needs_grid(node, v)
        channels = v.data.shape[1] if v.data.dim() > 1 else 1
        key = (node, channels)
        if key not in self.tables:
            self.tables[key] = self._table(node, args, kwargs, v, grid, channels)
        table = self.tables[key]
        index = (v.data - v.grid.qmin) * channels
        if channels > 1:
            index = index + torch.arange(channels).reshape(-1, *(1,) * (v.data.dim() - 2))
        return QTensor.on(table[index], grid)

    def _table(self, node, args, kwargs, v, grid, channels) -> torch.Tensor:
        """``T[k, c] = clamp(round(f(S_in (k - Z_in)) / S_out) + Z_out)`` for every code ``k``
        of ``v``'s grid and channel ``c`` (flattened): ``f`` is the node's own float function,
        run on a probe batch holding code ``k`` in every element of row ``k``."""
        src = v.grid
        codes = torch.arange(src.qmin, src.qmax + 1, dtype=torch.float32)
        x = (codes - src.zero_point) * torch.tensor(src.scale, dtype=torch.float32)
        probe = x.reshape(-1, *(1,) * (v.data.dim() - 1)).expand(
            -1, channels, *(1,) * (v.data.dim() - 2)).contiguous() if v.data.dim() > 1 else x
        swap = lambda a: probe if a is v else a  # noqa: E731
        y = self._call(node, [swap(a) for a in args], kwargs)
        lo, hi = self._bounds(node, grid)
        t = lambda n: torch.tensor(float(n))  # noqa: E731
        out = quantize(y.float(), t(grid.scale), t(grid.zero_point), t(lo), t(hi))
        return out.reshape(len(codes), channels).flatten().to(torch.int64)

    def _add(self, node, args, kwargs) -> QTensor:
        a, b = args[:2]
        if not (isinstance(a, QTensor) and isinstance(b, QTensor)):
            raise ModelError(f"{node.name}: the integer engine adds two quantized tensors only")
        grid = self.lowering.output_grid(node)
        if grid is None:
            return _stream_add(a, b, node.name, self.stream_scales[node])
        return QTensor.on(_rescale_sum((a, b), grid).clamp(*self._bounds(node, grid)), grid)

    def _mul(self, node, args, kwargs) -> QTensor:
        a, b = args[:2]
        if not (isinstance(a, QTensor) and isinstance(b, QTensor)):
            raise ModelError(f"{node.name}: the integer engine multiplies two quantized "
                             "tensors only")
        grid = self._needs_grid(node, a, b)
        m0, shift = fixed_point(a.scale * b.scale / grid.scale)
        product = (a.data - a.zero_point) * (b.data - b.zero_point)
        data = multiply_by_fixed_point(product, m0, shift) + grid.zero_point
        return QTensor.on(data.clamp(*self._bounds(node, grid)), grid)

    def _concat(self, node, args, kwargs) -> QTensor:
        values = list(args[0])
        grid = self._needs_grid(node, *values)
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return QTensor.on(torch.cat([_requantize_to(v, grid) for v in values], dim), grid)

    def _avgpool(self, node, args, kwargs) -> QTensor:
        v = args[0]
        sums, count = _pool_sums(node, self._module(node), v, args, kwargs)
        grid = self.lowering.output_grid(node)
        if grid is None:  # a stream stays a stream at its own scale
            m0, shift = fixed_point(1.0 / count)
            return QTensor(multiply_by_fixed_point(sums, m0, shift), v.scale, 0, v.bound)
        m0, shift = fixed_point(v.scale / (count * grid.scale))
        data = multiply_by_fixed_point(sums, m0, shift) + grid.zero_point
        return QTensor.on(data.clamp(*self._bounds(node, grid)), grid)

    def _maxpool(self, node, args, kwargs) -> QTensor:
        v = args[0]
        return v.like(self._call(node, [v.data.double(), *args[1:]], kwargs).to(torch.int64))

    def _resize(self, node, args, kwargs) -> QTensor:
        v = args[0]
        y = self._call(node, [(v.data - v.zero_point).double(), *args[1:]], kwargs)
        data = torch.round(y).to(torch.int64) + v.zero_point
        return v.like(data.clamp(v.grid.qmin, v.grid.qmax) if v.grid else data)

    def _move(self, node, args, kwargs):
        v = args[0]
        if isinstance(v, (tuple, list)):  # an item of a chunk / split
            return v[args[1]]
        if isinstance(self._module(node), (nn.Identity, nn.Dropout, nn.Dropout2d)) \
                or getattr(node.target, "__name__", "") in ("dropout", "stochastic_depth"):
            return v  # identity, dropout (eval): nothing to move
        if node.target is F.pad:
            if kwargs.get("mode", "constant") != "constant" or \
                    (args[2] if len(args) > 2 else kwargs.get("value")):
                raise ModelError(f"{node.name}: only zero padding has an integer form")
            return v.like(F.pad(v.data, args[1], value=v.zero_point))
        out = self._call(node, *_integers((args, kwargs)))
        if isinstance(out, (tuple, list)):
            return tuple(v.like(t) for t in out)
        return v.like(out)


def _what(node, modules) -> str:
    module = modules.get(node.target) if node.op == "call_module" else None
    return type(module).__name__ if module is not None else \
        getattr(node.target, "__name__", str(node.target))


def _holds_qtensor(tree) -> bool:
    found = []
    fx.node.map_aggregate(tree, lambda a: found.append(a) if isinstance(a, QTensor) else None)
    return bool(found)


def _integers(tree):
    """``tree`` with each QTensor replaced by its integers (for sizes and pure moves)."""
    return fx.node.map_aggregate(tree, lambda a: a.data if isinstance(a, QTensor) else a)


def _pool_sums(node, module, v: QTensor, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact integer window sums of ``v - Z``, the divisor of each window) of an average
    pooling node: global (``mean`` over H, W; adaptive to 1), adaptive to a size dividing the
    input, or ``avg_pool2d`` with its padding rules."""
    centered = (v.data - v.zero_point).double()
    if node.op == "call_method":  # x.mean(dims, keepdim)
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = tuple(d % centered.dim() for d in ((dims,) if isinstance(dims, int) else dims))
        keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        count = 1
        for d in dims:
            count *= centered.shape[d]
        return centered.sum(dims, keepdim=keep).round().to(torch.int64), torch.tensor(count)
    h, w = centered.shape[-2:]
    if isinstance(module, nn.AdaptiveAvgPool2d) or node.target is F.adaptive_avg_pool2d:
        window = adaptive_window(node, module, h, w)
        if window is None:
            raise ModelError(f"{node.name}: adaptive average pooling of a {h}x{w} input has "
                             "uneven windows; the engine pools even ones only")
        options = dict(kernel_size=window, stride=window, padding=0, ceil_mode=False,
                       count_include_pad=True, divisor_override=None)
    else:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
        if module is not None:
            options = {k: getattr(module, k) for k in names}
        else:
            options = dict(zip(names, args[1:]), **kwargs)
            options.setdefault("stride", None)
            options = {k: options.get(k, d) for k, d in zip(
                names, (None, None, 0, False, True, None))}
    sums = F.avg_pool2d(centered, **{**options, "divisor_override": 1})
    ones = torch.ones_like(centered[:1, :1])
    valid = F.avg_pool2d(ones, **{**options, "divisor_override": 1})
    count = valid / F.avg_pool2d(ones, **options)  # the divisor torch's own kernel uses
    return sums.round().to(torch.int64), count.round()


def _requantize_to(v: QTensor, grid: Grid) -> torch.Tensor:
    """``v``'s integers on ``grid``: ``clamp(Z + round((v - Z_v) * S_v / S))``."""
    if v.grid == grid:
        return v.data
    m0, shift = fixed_point(v.scale / grid.scale)
    data = multiply_by_fixed_point(v.data - v.zero_point, m0, shift) + grid.zero_point
    return data.clamp(grid.qmin, grid.qmax)


def _rescale_sum(values, grid: Grid) -> torch.Tensor:
    """``Z + round(sum S_i (q_i - Z_i) / S)`` (unclamped): each term rescaled to ``S / 2^f`` in
    fixed point, the sum shifted down with one rounding. ``f`` is :data:`FINE_BITS`, less where
    a term's multiplier ``S_i / S`` is so large that ``2^f S_i / S`` would pass 2^30 (the most a
    fixed-point multiplier with a right shift holds)."""
    ratios = [v.scale / grid.scale for v in values]
    fine = min(FINE_BITS, 29 - max(math.frexp(r)[1] for r in ratios))
    if fine < 1:
        raise NumericalError(f"an add's operand scale is {max(ratios):.3g} times its output's: "
                             "no fixed-point rescaling holds that")
    total = 0
    for v, ratio in zip(values, ratios):
        m0, shift = fixed_point(ratio * 2 ** fine)
        total = total + multiply_by_fixed_point(v.data - v.zero_point, m0, shift)
    return round_shift(total, fine) + grid.zero_point


def _stream_add(a: QTensor, b: QTensor, name: str, scale: float | None) -> QTensor:
    """``a + b`` as a stream at ``scale``, or, if None, at ``(R_a + R_b) / 2^29`` with
    ``R = S * bound`` (zero point 0)."""
    bound = INT32
    if scale is None:
        scale, bound = (a.scale * a.bound + b.scale * b.bound) / 2 ** STREAM_BITS, 2 ** STREAM_BITS
    total = 0
    for v in (a, b):
        m0, shift = fixed_point(v.scale / scale)
        total = total + multiply_by_fixed_point(v.data - v.zero_point, m0, shift)
    return QTensor(_check_int32(total, name), scale, 0, bound)
