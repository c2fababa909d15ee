"""One description of a quantized network for every backend: simulation, integer engine, ONNX.

:func:`lower` traces a quantized model (from :func:`lowbit.quantize` or a training method) and
returns a :class:`Lowering`: the FX graph, and for every node

* its **kind**, one entry of :data:`KINDS` (found by :func:`kind_of` from one table of
  functions, methods and module types): what the node means on an integer device;
* its **grid**, a :class:`Grid` ``(S, Z, q_min, q_max)`` when the device holds that tensor as
  integers ``q`` standing for ``S (q - Z)``, or None: a float tensor (before the first
  quantizer), the last layer's int32 accumulator (the output, dequantized once), or, in the
  simulation form, an int32 "stream" that the engine keeps at a fine scale.

Every backend is a small translator of that description. The simulation
(:meth:`Lowering.simulation`) runs the graph in float and fake-quantizes every tensor that has a
grid; the integer engine (:class:`lowbit.deploy.IntegerEngine`) gives each kind an integer kernel;
the ONNX writer (:func:`lowbit.deploy.to_onnx`) puts ``QuantizeLinear -> DequantizeLinear`` on
the same tensors and lets PyTorch's exporter write every float op. Adding an op is one table
entry here and, if it moves integers in a new way, one kernel in the engine. Since the three
read one set of grids, "the simulation quantizes exactly what the device quantizes" holds by
construction.

Two forms, one set of rules:

* **simulation form** (``calib=None``): grids only where the model's own quantizers round, so the
  simulation computes what the model computes. Residual adds and pooling stay off any 8-bit grid
  (the engine keeps them as int32 streams, ONNX as float).
* **fully quantized** (``calib`` batches): every tensor after the first quantizer is an integer,
  as integer runtimes need. Where a tensor's grid is not fixed by the rules below, it gets an
  ``act_bits`` asymmetric min-max grid from a running min / max over ``calib`` (no activations
  are stored).

The rules (TFLite's integer conventions; Jacob et al. 2018):

1. **Moves** (reshapes, slicing, chunks, zero padding, dropout, max pooling, nearest upsampling)
   and **clamps** on a grid keep their input's grid: they move or clamp integers. Bilinear
   resizing also keeps it (and rounds onto it, as TFLite's ``RESIZE_BILINEAR``).
2. A clamp (ReLU, ReLU6, hardtanh, clamp) that is the only user of a rescaling node is *fused*
   into it: the node writes straight onto the clamp's output grid, the clamp's bounds becoming
   integer bounds. This is exact: rounding is monotone, so
   ``fq(clamp(y, lo, hi)) == clamp(round(y / S) + Z, Z + round(lo / S), Z + round(hi / S))``.
3. A **rescaling** node (Conv / Linear, add, mul, concat, average pooling, a lookup-table
   activation, batch norm left unfolded) writes onto the input grid of its consumers when those
   are quantized layers sharing one grid (seen through moves), so the device's requantization is
   the layer's own input rounding and costs nothing; else onto a calibrated grid (fully
   quantized) or none (simulation form). In the fully quantized form, consumers that rescale
   their inputs anyway (add, mul, concat, average pooling, lookup tables) read any grid, so a
   residual block's output that feeds the next block's first conv and its shortcut add is
   written once, on that conv's grid, when the grid has at least ``act_bits`` bits: a second,
   calibrated grid would cost a requantization (a ``DequantizeLinear -> QuantizeLinear`` pair
   that runtimes execute: five of them on ResNet-20) and round the conv's input twice. A coarser layer grid (4-bit activations) is not forced onto the
   adds, which keep an ``act_bits`` grid.
4. A layer whose only consumer is the graph output keeps its int32 accumulator.
"""
from __future__ import annotations

import copy
import math
from dataclasses import astuple, dataclass

import torch
from torch import fx, nn

from lowbit.errors import CalibrationError, ConfigError, DataError, ModelError
from lowbit.nn.accumulator import integer_codes
from lowbit.nn.layers import QUANT_LAYERS
from lowbit.quant.affine import affine_qparams, fake_quantize
from lowbit.transforms.fold import trace
from lowbit.transforms.ops import (KEEPS_GRID, KINDS, MOVES, clamp_bounds, kind_of, tensor_args,
                                  yields_tuple)

__all__ = ["Grid", "Lowering", "lower", "with_grids", "KINDS", "clamp_bounds"]


@dataclass(frozen=True)
class Grid:
    """Per-tensor integer qparams: ``q`` in ``[qmin, qmax]`` stands for ``scale * (q - zero_point)``
    (``scale`` a float32 value, as the quantizers hold it)."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @classmethod
    def of(cls, q: nn.Module) -> "Grid | None":
        """The grid of a calibrated per-tensor affine (or LSQ) quantizer, else None."""
        codes = integer_codes(q)
        if codes is None or codes.scale.dim():
            return None
        return cls(float(codes.scale), int(codes.zero_point), int(codes.quant_min),
                   int(codes.quant_max))

    @classmethod
    def covering(cls, lo: float, hi: float, bits: int) -> "Grid":
        """The asymmetric unsigned ``bits``-bit grid of [lo, hi] (widened to hold 0)."""
        qmax = 2 ** bits - 1
        scale, zero = affine_qparams(torch.tensor(lo), torch.tensor(hi), 0, qmax, symmetric=False)
        return cls(float(scale), int(zero), 0, qmax)

    @property
    def bound(self) -> int:
        """The largest ``|q - Z|`` on the grid."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))

    def code(self, value: float) -> int:
        """The code of a real value, clamped to the grid (infinities to its ends)."""
        if math.isinf(value):
            return self.qmax if value > 0 else self.qmin
        return int(min(max(round(value / self.scale) + self.zero_point, self.qmin), self.qmax))

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``S (clamp(round(x / S) + Z, q_min, q_max) - Z)``, as the layer quantizers compute it
        (``x`` times a float32 ``1/S``). In float64 (the exact simulation) ``x / S`` is a true
        division, so that an exact tie stays one: an average pool of 2^k values on its input's
        grid lands on ``S (k + 1/2)`` exactly, and ``x * (1/S)`` would move it off."""
        if x.dtype == torch.float64:
            codes = torch.round(x / self.scale) + self.zero_point
            return self.scale * (codes.clamp(self.qmin, self.qmax) - self.zero_point)
        t = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
        return fake_quantize(x, t(self.scale), t(self.zero_point), t(self.qmin), t(self.qmax))


@dataclass
class Lowering:
    """A traced quantized model with each node's kind and each tensor's grid (see the module
    docstring). ``fused[n]`` is the clamp node that node ``n`` writes through."""

    graph_module: fx.GraphModule
    modules: dict
    kinds: dict
    grids: dict
    fused: dict
    quantized: set
    fully_quantized: bool

    def layer_grid(self, node: fx.Node) -> Grid | None:
        """The input grid of a quantized layer node (its quantizer's)."""
        return Grid.of(self.modules[node.target].input_quantizer)

    def output_grid(self, node: fx.Node) -> Grid | None:
        """The grid that ``node``'s computation writes onto: its own, or its fused clamp's."""
        return self.grids.get(self.fused.get(node, node))

    def simulation(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The fake-quant simulation of this form: the model with every gridded tensor
        fake-quantized (in the simulation form, the model itself up to idempotent roundings).

        ``dtype=torch.float64`` runs it in double precision (float32 logits out), with the
        weights the float32 model defines: each layer's integer codes (rounded in float32, as
        the engine and the ONNX file read them) times their scales, exact in float64, and its
        bias on the accumulator grid (:func:`_exact_layer`). Its sums are then exact for the
        integer engine's purposes, so it tells float32 rounding noise from engine error. (Re-rounding the weights in float64 would not do: a weight within a
        float32 error of a half step gets the other code, and the change propagates.)"""
        module = with_grids(self, lambda graph, node, grid: graph.call_function(
            _fake_quantize, (node, *astuple(grid))))
        if dtype == torch.float32:
            return module
        module = copy.deepcopy(module)
        for name, layer in module.named_modules():
            if isinstance(layer, QUANT_LAYERS):
                weight, bias = _exact_layer(layer, name)
                layer.weight_quantizer = nn.Identity()
                layer.weight = nn.Parameter(weight, requires_grad=False)
                if bias is not None:
                    layer.bias = nn.Parameter(bias, requires_grad=False)
        return _InDtype(module.to(dtype), dtype)


def _exact_layer(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantized layer's ``(weight, bias)`` in float64 as the integer engine reads them: the
    weight ``S_W (q_W - Z_W)`` from its integer codes; the bias ``k S_W S_X`` with
    ``k = round(b / (S_W S_X))`` where ``b`` lies on that accumulator grid to float32 precision
    (``int_bias`` put it there; float32 holds ``k S_W S_X`` only to 2^-24 of ``|b|``, which is
    many output steps' worth of error for a large bias), else ``b``. Where the weights are not
    affine codes (a per-channel shift, binary scales), the float32 quantized weight."""
    from lowbit.deploy.integer import input_grid, integer_weight  # the engine reads lowerings

    bias = None if layer.bias is None else layer.bias.detach().double()
    try:
        integers, s_w = integer_weight(layer, name)
        s_acc = s_w * input_grid(layer, name).scale
    except ConfigError:
        return layer.quantized_weight().detach().double(), bias
    weight = integers.double() * s_w.reshape((-1,) + (1,) * (integers.dim() - 1))
    if bias is not None:
        on_grid = torch.round(bias / s_acc) * s_acc
        bias = torch.where((bias - on_grid).abs() <= 2 ** -23 * bias.abs(), on_grid, bias)
    return weight, bias


class _InDtype(nn.Module):
    """``module`` run in ``dtype``: inputs cast to it, outputs back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int):
    """:meth:`Grid.fake_quantize` as a graph function (generated code holds plain numbers)."""
    return Grid(scale, zero_point, qmin, qmax).fake_quantize(x)


def with_grids(lowering: Lowering, quantize, layers: dict | None = None) -> fx.GraphModule:
    """A copy of the lowered graph where ``quantize(graph, node, grid)`` adds a node after every
    tensor that has a grid, and the layer modules named in ``layers`` are replaced."""
    source = lowering.graph_module
    graph = fx.Graph()
    env: dict = {}
    for node in source.graph.nodes:
        new = graph.node_copy(node, lambda a: env[a])
        grid = lowering.grids.get(node)
        if grid is not None:
            with graph.inserting_after(new):
                new = quantize(graph, new, grid)
        env[node] = new
    root = dict(source.named_modules())
    root.update(layers or {})
    module = fx.GraphModule(root, graph, class_name="LoweredModel")
    return module.eval()


def lower(qmodel: nn.Module, calib=None, act_bits: int = 8) -> Lowering:
    """The :class:`Lowering` of ``qmodel``: the simulation form, or, given ``calib`` (an iterable
    of input batches or ``(input, target)`` pairs), the fully quantized form with
    ``act_bits``-bit grids where the rules leave a tensor free."""
    if isinstance(qmodel, Lowering):
        return qmodel
    traced, reason = trace(qmodel)
    if traced is None:
        raise ModelError(f"the model cannot be traced, so it cannot be lowered to integers: "
                         f"{reason}; wrap the untraceable call with torch.fx.wrap, or make its "
                         "module a leaf of the tracer")
    if not 2 <= act_bits <= 16:
        raise ConfigError(f"act_bits must be in 2..16, got {act_bits}")
    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    kinds, meta = {}, set()
    for node in nodes:
        kinds[node] = kind_of(node, modules, meta)
        if kinds[node] == "meta":
            meta.add(node)
    quantized = _quantized_region(nodes, modules, kinds)
    lowering = Lowering(traced, modules, kinds, {}, {}, quantized, calib is not None)
    free = _assign_grids(lowering, nodes, act_bits)
    if calib is not None and free:
        ranges = _observe_ranges(traced, calib, free)
        for node in free:
            lowering.grids[node] = Grid.covering(*ranges[node], act_bits)
    _inherit_grids(lowering, nodes)
    return lowering


def _quantized_region(nodes, modules, kinds) -> set:
    """The nodes whose value is an integer tensor on the device: quantized layers with affine
    integer weights and inputs, and every tensor node computed from one."""
    region = set()
    for node in nodes:
        if kinds[node] == "meta":
            continue
        if kinds[node] == "layer":
            layer = modules[node.target]
            if integer_codes(layer.weight_quantizer, layer.weight) is not None and \
                    integer_codes(layer.input_quantizer) is not None:
                region.add(node)
        elif any(a in region for a in tensor_args(node)):
            region.add(node)
    return region


RESCALES_ANY_GRID = {"add", "mul", "concat", "avgpool", "lut"}  # rule 3, fully quantized form


def _consumer_grid(lowering: Lowering, node, act_bits: int) -> Grid | None:
    """The one input grid of ``node``'s consumers (seen through moves) when all are quantized
    layers or, in the fully quantized form, rescaling ops beside quantized layers whose grid
    has at least ``act_bits`` bits (rule 3); else None."""
    grids, frontier, rescalers = set(), list(node.users), False
    while frontier:
        user = frontier.pop()
        kind = lowering.kinds.get(user)
        if kind in MOVES:
            frontier.extend(user.users)
        elif kind == "layer" and user in lowering.quantized and lowering.layer_grid(user):
            grids.add(lowering.layer_grid(user))
        elif lowering.fully_quantized and kind in RESCALES_ANY_GRID and user in lowering.quantized:
            rescalers = True
        else:
            return None
    if len(grids) != 1:
        return None
    grid = grids.pop()
    if rescalers and grid.qmax - grid.qmin + 1 < 2 ** act_bits:
        return None
    return grid


def _assign_grids(lowering: Lowering, nodes, act_bits: int) -> list:
    """Rules 2-4 of the module docstring; returns the nodes left for calibration (fully
    quantized form only)."""
    free = []
    for node in nodes:
        if node not in lowering.quantized or node.op == "output" or \
                node in lowering.fused.values():
            continue
        kind = lowering.kinds[node]
        users = list(node.users)
        if kind in KEEPS_GRID:
            continue  # its source's grid, once known: _inherit_grids
        target = users[0] if len(users) == 1 and _fusable_clamp(lowering, users[0]) else node
        if kind == "layer" and all(u.op == "output" for u in target.users):
            continue  # the output accumulator
        grid = _consumer_grid(lowering, target, act_bits)
        if grid is None and not lowering.fully_quantized:
            continue
        if target is not node:
            lowering.fused[node] = target
        if grid is None:
            free.append(target)
        else:
            lowering.grids[target] = grid
    return free


def _inherit_grids(lowering: Lowering, nodes) -> None:
    """Rule 1: moves, clamps and resizes take their quantized input's grid (a chunk's items take
    the chunked tensor's; the tuple itself has none)."""
    for node in nodes:
        if node in lowering.quantized and lowering.kinds[node] in KEEPS_GRID and \
                node not in lowering.fused.values() and not yields_tuple(node):
            source = next(a for a in tensor_args(node) if a in lowering.quantized)
            while yields_tuple(source):
                source = next(a for a in tensor_args(source) if a in lowering.quantized)
            if lowering.output_grid(source) is not None:
                lowering.grids[node] = lowering.output_grid(source)


def _fusable_clamp(lowering: Lowering, node) -> bool:
    """A clamp that is the only user of a rescaling node (rule 2)."""
    if lowering.kinds.get(node) != "clamp":
        return False
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and len(source.users) == 1 and \
        lowering.kinds.get(source) not in KEEPS_GRID | {None, "meta"} and \
        source in lowering.quantized


@torch.no_grad()
def _observe_ranges(traced: fx.GraphModule, calib, nodes) -> dict:
    """Running (min, max) of each node in ``nodes`` over the calibration batches."""
    ranges, wanted = {}, set(nodes)
    interpreter = fx.Interpreter(traced)
    run_node = interpreter.run_node

    def record(node):
        value = run_node(node)
        if node in wanted:
            if not torch.isfinite(value).all():
                raise CalibrationError(f"{node.name}: NaN or Inf in the calibration activations")
            lo, hi = ranges.get(node, (math.inf, -math.inf))
            ranges[node] = (min(lo, value.min().item()), max(hi, value.max().item()))
        return value

    interpreter.run_node = record
    seen = 0
    for batch in calib:
        interpreter.run(batch[0] if isinstance(batch, (tuple, list)) else batch)
        seen += 1
    if not seen:
        raise DataError("the calibration data for the fully quantized form is empty")
    return ranges
