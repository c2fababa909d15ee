"""QDQ ONNX export of a quantized model, run and checked in onnxruntime.

The exported graph is a :class:`lowbit.deploy.lowering.Lowering` written by PyTorch's own ONNX
exporter: the lowering's graph, with ``QuantizeLinear -> DequantizeLinear`` after every tensor
that has a grid (in the simulation form, the layer inputs; fully quantized, every tensor), and
each quantized layer as ``DequantizeLinear(integer codes) -> Conv / Gemm``. So every float op the
exporter knows (SiLU, Hardswish, Resize, Concat, pooling, reshapes, ...) exports with no code
here, and onnxruntime quantizes exactly the tensors the simulation and the integer engine do.

* Weights (affine, LSQ, or BinaryConnect / BWN / TWN codes in {-1, 0, 1}: see
  :class:`lowbit.nn.accumulator.IntegerCodes`) are integer initializers at their real width (INT4 / UINT4 up to 4 bits, 8-bit or
  16-bit types above; full-range int8 weights as uint8 with zero point 128, see
  :class:`_ExportLayer`) behind a per-channel ``DequantizeLinear``; biases are int32 at the
  accumulator scale ``S_W * S_X`` (the grid :func:`lowbit.nn.accumulator.round_biases` puts
  them on) behind their own ``DequantizeLinear``.
* Integer ranges narrower than their ONNX type (3-bit codes, the restricted signed range) get a
  ``Clip`` on the integers between ``QuantizeLinear`` and ``DequantizeLinear``, so onnxruntime
  rounds exactly as the simulation.

The TorchScript-based exporter (``dynamo=False``) writes the graph: it exports an
``autograd.Function``'s ``symbolic`` (the two QDQ nodes above, a few lines), needs no onnxscript,
and writes a MobileNet in under a second where the torch.export-based exporter takes over ten
(and cannot trace fake-quantize ops at all; it would need a custom op and a translation table).
It emits opset 20; INT4 initializers need opset 21, whose changes to the ops used here only add
types, so the opset is raised after export. A few passes then shape the graph for onnxruntime:
each layer keeps its own initializers (the exporter shares identical ones), 4-bit weights become
INT4 / UINT4, QDQ qparams become scalar initializers (its QLinearAdd fusion needs them), and a
spatial mean becomes ``GlobalAveragePool`` with any flatten moved behind its QDQ (so pooling and
the classifier run its integer kernels).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import astuple
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from lowbit.devices import cpu_threads
from lowbit.deploy.lowering import Grid, Lowering, lower, with_grids
from lowbit.errors import ExportError, LowbitError
from lowbit.io import atomic_write
from lowbit.nn.accumulator import accumulator_scale, integer_codes
from lowbit.nn.layers import QuantConv2d
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer
from lowbit.transforms.ops import adaptive_window

OPSET = 21  # INT4 / UINT4 QuantizeLinear and DequantizeLinear
EXPORTER_OPSET = 20  # the newest the TorchScript exporter writes
IR_VERSION = 10  # what opset 21 needs; onnx's default (its newest) may be newer than the runtime
_TORCH_DTYPES = {np.uint8: torch.uint8, np.int8: torch.int8, np.int16: torch.int16,
                 np.int32: torch.int32}


def _integer_type(qmin: int, qmax: int, four_bit: bool = True):
    """(ONNX type, numpy dtype, type min, type max): the narrowest QDQ type holding [qmin, qmax]
    (4-bit types only if ``four_bit``)."""
    four = ((TensorProto.UINT4, np.uint8, 0, 15), (TensorProto.INT4, np.int8, -8, 7))
    for onnx_type, dtype, lo, hi in (*(four if four_bit else ()),
                                     (TensorProto.UINT8, np.uint8, 0, 255),
                                     (TensorProto.INT8, np.int8, -128, 127),
                                     (TensorProto.INT16, np.int16, -32768, 32767)):
        if lo <= qmin and qmax <= hi:
            return onnx_type, dtype, lo, hi
    raise ExportError(f"integer range [{qmin}, {qmax}] fits no ONNX quantized type")


def _constant(g, array: np.ndarray):
    return g.op("Constant", value_t=torch.from_numpy(np.ascontiguousarray(array)))


class _QDQ(torch.autograd.Function):
    """Fake quantization onto a grid; exported as ``QuantizeLinear -> [Clip] -> DequantizeLinear``
    (8- and 16-bit types: activations run the runtime's integer kernels at those widths)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        return Grid(scale, zero_point, qmin, qmax).fake_quantize(x)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        onnx_type, dtype, lo, hi = _integer_type(qmin, qmax, four_bit=False)
        if onnx_type == TensorProto.INT8 and -128 <= zero_point <= 127:
            # A signed 8-bit grid is written as uint8 codes q + 128 with zero point Z + 128:
            # the same q - Z, exactly. onnxruntime's x86 integer kernels take uint8
            # activations; given int8 ones beside another consumer (a residual add) it left
            # MobileNetV2's convolutions and adds in float, at half the speed.
            zero_point, qmin, qmax = zero_point + 128, qmin + 128, qmax + 128
            dtype, lo, hi = np.uint8, 0, 255
        s = _constant(g, np.array(scale, dtype=np.float32))
        z = _constant(g, np.array(zero_point, dtype=dtype))
        codes = g.op("QuantizeLinear", x, s, z)
        if (qmin, qmax) != (lo, hi):
            codes = g.op("Clip", codes, _constant(g, np.array(qmin, dtype=dtype)),
                         _constant(g, np.array(qmax, dtype=dtype)))
        out = g.op("DequantizeLinear", codes, s, z)
        out.setType(x.type())  # keep the shape known: later symbolics (adaptive pooling) need it
        return out


class _Dequantize(torch.autograd.Function):
    """``S (q - Z)`` per output channel of integer codes; exported as ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        out = g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)
        out.setType(codes.type().with_dtype(torch.float32))
        return out


def _qdq(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return _QDQ.apply(x, scale, zero_point, qmin, qmax)


class _ExportLayer(nn.Module):
    """A quantized Conv / Linear as the exporter should see it: its input QDQ (unless its
    producer already put the tensor on that grid), integer weight codes and int32 bias codes as
    buffers behind :class:`_Dequantize`, then the float op."""

    def __init__(self, layer, name: str, input_grid: Grid | None):
        super().__init__()
        self.layer_name, self.input_grid = name, input_grid
        self.conv = isinstance(layer, QuantConv2d)
        if self.conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ExportError(f"{name}: padding {layer.padding!r} / {layer.padding_mode} is "
                                  "not exported (numeric zero padding only)")
            self.options = dict(stride=layer.stride, padding=layer.padding,
                                dilation=layer.dilation, groups=layer.groups)
        slot = layer.weight_quantizer
        q = integer_codes(slot, layer.weight)
        if q is None:
            raise ExportError(f"{name}: {type(slot).__name__} weights have no QDQ form (affine, "
                              "LSQ and {-1, 0, 1} binary / ternary codes only; a never-calibrated "
                              "quantizer has none)")
        w = layer.weight.detach()
        rows = w.shape[0]
        codes = q.codes(w).to(torch.int64)
        self.qmin, self.qmax = int(q.quant_min.min()), int(q.quant_max.max())
        onnx_type, dtype, _, _ = _integer_type(self.qmin, self.qmax)
        zero = (q.zero_point.expand(rows) if q.zero_point.dim() == 0 else q.zero_point).long()
        if onnx_type == TensorProto.INT8 and (self.qmin < -64 or self.qmax > 63):
            # x86 CPUs without AVX-512 VNNI multiply uint8 x int8 in pairs summed in saturating
            # int16 (vpmaddubsw): 255 * 127 * 2 overflows, and onnxruntime's fused QLinearConv is
            # then wrong by several steps. uint8 codes with zero point 128 are the same q - Z,
            # exactly, and take the uint8 x uint8 kernel, which does not saturate.
            codes, zero, dtype = codes + 128, zero + 128, np.uint8
            self.qmin, self.qmax = self.qmin + 128, self.qmax + 128
        torch_dtype = _TORCH_DTYPES[dtype]
        self.register_buffer("weight_codes", codes.to(torch_dtype))
        self.register_buffer("weight_scale", (q.scale.expand(rows) if q.scale.dim() == 0
                                              else q.scale).float().clone())
        self.register_buffer("weight_zero_point", zero.to(torch_dtype))
        self.gain = self.shift = None
        if isinstance(slot, CorrectedQuantizer) and slot.gain.numel():
            shape = (-1,) + (1,) * (w.dim() - 1)
            self.register_buffer("weight_gain", slot.gain.reshape(shape).float().clone())
            self.register_buffer("weight_shift", slot.shift.reshape(shape).float().clone())
            self.gain = True
        self.bias_kind = None
        if layer.bias is not None:
            scale = accumulator_scale(layer)
            if scale is None:  # no integer accumulator (a float input, say): a float bias
                self.register_buffer("bias", layer.bias.detach().float().clone())
                self.bias_kind = "float"
            else:
                bias = torch.round(layer.bias.detach().double() / scale).to(torch.int32)
                self.register_buffer("bias_codes", bias)
                self.register_buffer("bias_scale", scale.float())
                self.register_buffer("bias_zero_point", torch.zeros_like(bias))
                self.bias_kind = "int32"

    def forward(self, x):
        if self.input_grid is not None:
            x = _QDQ.apply(x, *astuple(self.input_grid))
        w = _Dequantize.apply(self.weight_codes, self.weight_scale, self.weight_zero_point)
        if self.gain:
            w = w * self.weight_gain + self.weight_shift
        b = None
        if self.bias_kind == "float":
            b = self.bias
        elif self.bias_kind == "int32":
            b = _Dequantize.apply(self.bias_codes, self.bias_scale, self.bias_zero_point)
        if self.conv:
            return F.conv2d(x, w, b, **self.options)
        return F.linear(x, w, b)


def export_layers(lowering: Lowering) -> dict[str, _ExportLayer]:
    """An :class:`_ExportLayer` (integer codes, input grid) for every quantized layer of the
    lowering, by module name; the ONNX and XNNPACK writers both read them."""
    layers = {}
    for node in lowering.graph_module.graph.nodes:
        if lowering.kinds[node] != "layer":
            continue
        layer = lowering.modules[node.target]
        q = layer.input_quantizer
        grid = None
        if isinstance(q, (AffineQuantizer, LSQQuantizer)):
            codes = integer_codes(q)
            if codes is None:
                raise ExportError(f"{node.target}: the input quantizer was never calibrated")
            if codes.scale.dim():
                raise ExportError(f"{node.target}: per-channel activation scales have no QDQ "
                                  "Conv form; quantize with a_per_channel: false")
            grid = Grid.of(q)
            source = node.args[0]
            if lowering.grids.get(source) == grid:
                grid = None  # the producer's QDQ already rounds onto this grid
        elif not isinstance(q, nn.Identity):
            raise ExportError(f"{node.target}: {type(q).__name__} inputs have no QDQ form")
        layers[node.target] = _ExportLayer(layer, node.target, grid)
    return layers


def export_module(lowering: Lowering, example: torch.Tensor) -> nn.Module:
    """The lowering as the module PyTorch's exporter writes: QDQ after every gridded tensor,
    :class:`_ExportLayer` for every quantized layer (``example``: an input, for shapes)."""
    module = with_grids(lowering, lambda graph, node, grid: graph.call_function(
        _qdq, (node, *astuple(grid))), export_layers(lowering))
    _even_adaptive_pools(module, example)
    return module


def _even_adaptive_pools(module: fx.GraphModule, example: torch.Tensor) -> None:
    """Adaptive average pooling to a size that divides the input, as the ``avg_pool2d`` it is:
    the exporter reads input sizes for adaptive pooling and cannot see them through the QDQ
    symbolics (global pooling needs none and stays as it is)."""
    ShapeProp(module).propagate(example)
    for node in module.graph.nodes:
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        shape = getattr(source.meta.get("tensor_meta"), "shape", None) \
            if isinstance(source, fx.Node) else None
        if shape is None:  # not a tensor (a size, a chunk's tuple)
            continue
        size = tuple(shape[-2:])
        window = adaptive_window(node, layer, *size)
        if window not in (None, size):  # a window of the whole input is global pooling: kept
            node.op, node.target = "call_function", F.avg_pool2d
            node.args, node.kwargs = (source, window, window), {}
    module.recompile()


def to_onnx(qmodel: nn.Module | Lowering, input_shape, calib=None, act_bits: int = 8,
            residual_calib=None, int8_weights: bool = False) -> onnx.ModelProto:
    """The QDQ ONNX model of ``qmodel`` for inputs of ``input_shape`` (any batch size).

    By default the graph is the simulation exactly. Given ``calib`` (input batches) it is the
    fully quantized form (see :mod:`lowbit.deploy.lowering`): every tensor an integer, as integer
    runtimes need to fuse every op into their integer kernels. A
    :class:`~lowbit.deploy.lowering.Lowering` may be passed instead of the model.
    ``int8_weights``: store <= 4-bit weight codes as INT8 / UINT8 (the same codes, one byte
    each) instead of INT4 / UINT4, so int8 runtimes run them on their int8 kernels (onnxruntime
    and OpenVINO dequantize 4-bit weights to float); the numbers are unchanged, the file larger.
    ``residual_calib`` is the former name of ``calib`` (deprecated).
    """
    if residual_calib is not None:
        warnings.warn("to_onnx(residual_calib=...) is now to_onnx(calib=...)",
                      DeprecationWarning, stacklevel=2)
        calib = residual_calib if calib is None else calib
    try:
        lowering = lower(qmodel, calib, act_bits)
    except LowbitError as e:
        raise ExportError(str(e)) from None
    example = torch.zeros(1, *input_shape[1:])
    try:
        with torch.no_grad():
            module = export_module(lowering, example)
    except LowbitError:
        raise
    except Exception as e:  # the model's own shape checks raise RuntimeError, ValueError, ...
        raise ExportError(f"the model rejects an input of shape {tuple(example.shape)}: "
                          f"{' '.join(str(e).split())[:200]}") from None
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter warns that it is deprecated (see the module docstring)
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buffer, dynamo=False,
                              opset_version=EXPORTER_OPSET, input_names=["input"],
                              output_names=["output"], do_constant_folding=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as e:  # the exporter raises SymbolicValueError, RuntimeError, ...
        raise ExportError(f"PyTorch's ONNX exporter failed: {' '.join(str(e).split())[:300]}") \
            from None
    model = onnx.load_from_string(buffer.getvalue())
    _unshare_initializers(model)
    _scalar_qparams(model)
    _global_pools(model)
    if not int8_weights:
        _narrow_weights(model, module)
    model.opset_import[0].version = OPSET
    model.ir_version = IR_VERSION
    model.producer_name = "lowbit"
    onnx.checker.check_model(model)
    return model


def _unshare_initializers(model: onnx.ModelProto) -> None:
    """Undo the exporter's sharing of identical initializers (``Identity`` nodes from one
    layer's buffer to another's name): each layer keeps its own named codes and qparams."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            initializers[copy.name] = copy
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _scalar_qparams(model: onnx.ModelProto) -> None:
    """Turn the exporter's one-element ``Constant`` nodes feeding QuantizeLinear /
    DequantizeLinear / Clip into scalar initializers: onnxruntime fuses a DQ -> Add -> Q group
    into ``QLinearAdd`` only when its qparams are scalar initializers."""
    graph = model.graph
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    moved = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            continue
        for name in node.input[1:]:
            if name in constants and name not in moved:
                value = numpy_helper.to_array(constants[name].attribute[0].t)
                if value.size == 1:
                    graph.initializer.append(numpy_helper.from_array(value.reshape(()), name))
                    moved.add(name)
    kept = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in moved)]
    del graph.node[:]
    graph.node.extend(kept)


def _global_pools(model: onnx.ModelProto) -> None:
    """``ReduceMean`` over H and W of a 4-D tensor (how the exporter writes ``x.mean((2, 3))``)
    as ``GlobalAveragePool`` (then ``Flatten`` where the mean drops the dims): onnxruntime has
    an integer kernel for that one (QLinearGlobalAveragePool), none for ReduceMean."""
    graph = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             onnx.shape_inference.infer_shapes(model).graph.value_info}
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in graph.input})
    producers = {out: n for n in graph.node for out in n.output}
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        axes = node.input[1] if node.op_type == "ReduceMean" and len(node.input) > 1 else None
        value = None
        if axes in initializers:
            value = numpy_helper.to_array(initializers[axes])
        elif axes in producers and producers[axes].op_type == "Constant":
            value = numpy_helper.to_array(producers[axes].attribute[0].t)
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if value is None or ranks.get(node.input[0]) != 4 or \
                sorted(int(v) % 4 for v in value.flatten()) != [2, 3]:
            nodes.append(node)
            continue
        pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
        nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled],
                                      name=f"{node.name}_global"))
        if not keep:
            nodes.append(helper.make_node("Flatten", [pooled], [node.output[0]], axis=1,
                                          name=f"{node.name}_flatten"))
    del graph.node[:]
    graph.node.extend(nodes)
    _flatten_after_qdq(graph)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _flatten_after_qdq(graph) -> None:
    """``Flatten -> Q -> DQ`` as ``Q -> DQ -> Flatten -> Q -> DQ`` (a per-tensor QDQ commutes
    with a reshape and is idempotent), so the pooling before it sits between DQ and Q and the
    layer after it reads a DQ: the patterns onnxruntime fuses into integer kernels."""
    users = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for flat in [n for n in graph.node if n.op_type == "Flatten"]:
        q = users.get(flat.output[0], [])
        if len(q) != 1 or q[0].op_type != "QuantizeLinear":
            continue
        dq = users.get(q[0].output[0], [])
        if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
            continue
        source, flat_out, out = flat.input[0], flat.output[0], dq[0].output[0]
        q[0].input[0] = source
        dq[0].output[0] = f"{out}_unflattened"
        flat.input[0] = dq[0].output[0]
        again = helper.make_node("QuantizeLinear", [flat_out, *q[0].input[1:]],
                                 [f"{out}_codes"], name=f"{q[0].name}_flat")
        graph.node.append(again)
        graph.node.append(helper.make_node("DequantizeLinear", [again.output[0],
                                                                *dq[0].input[1:]], [out],
                                           name=f"{dq[0].name}_flat"))
    nodes = [onnx.NodeProto() for _ in graph.node]
    for copy, n in zip(nodes, graph.node):
        copy.CopyFrom(n)
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    order, seen = [], set()

    def visit(i):  # keep the node list topologically sorted after the rewiring
        if i in seen:
            return
        seen.add(i)
        for name in nodes[i].input:
            if name in made:
                visit(made[name])
        order.append(i)

    for i in range(len(nodes)):
        visit(i)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _narrow_weights(model: onnx.ModelProto, module: nn.Module) -> None:
    """Store the codes and zero points of <= 4-bit weights as INT4 / UINT4 initializers (torch
    has no 4-bit dtype to export them with)."""
    types = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _ExportLayer):
            onnx_type = _integer_type(layer.qmin, layer.qmax)[0]
            if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
                types[f"{name}.weight_codes"] = onnx_type
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    narrowed = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in types:
            continue
        onnx_type = types[node.input[0]]
        for slot in (0, 2):
            tensor = initializers[node.input[slot]]
            values = numpy_helper.to_array(tensor)
            tensor.CopyFrom(helper.make_tensor(tensor.name, onnx_type, values.shape,
                                               values.flatten().tolist()))
        narrowed.add(node.name)
    if len(narrowed) != len(types):
        raise ExportError(f"{len(types) - len(narrowed)} 4-bit weights were not found in the "
                          "exported graph")


def export_onnx(qmodel: nn.Module, path, input_shape, calib=None, act_bits: int = 8,
                residual_calib=None, int8_weights: bool = False) -> Path:
    """Write ``qmodel`` as a QDQ ONNX file (atomically; see :func:`to_onnx`); returns the path."""
    model = to_onnx(qmodel, input_shape, calib, act_bits, residual_calib, int8_weights)
    return atomic_write(path, lambda tmp: onnx.save(model, tmp))


ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # onnxruntime's built-in ops


def read_onnx(path) -> onnx.ModelProto:
    """An ONNX file given to lowbit, checked before onnxruntime sees it: a valid model whose
    tensors all live inside the file (an external-data reference names another file on disk to
    read) and whose ops come from onnxruntime's built-in domains. onnxruntime then parses and
    runs the graph: it runs no code from the file, but a hostile graph can still make it
    compute or allocate as much as its ops ask."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        raise ExportError(f"{path} is not a valid ONNX model: {' '.join(str(e).split())[:200]}") \
            from None
    graphs = [model.graph]
    while graphs:  # subgraphs of If / Loop / Scan nodes too
        graph = graphs.pop()
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute
                                             if a.HasField("t")]
        if any(t.data_location == TensorProto.EXTERNAL for t in tensors):
            raise ExportError(f"{path} refers to external tensor data (another file); lowbit "
                              "reads only self-contained ONNX files, as it writes them")
        graphs += [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
        graphs += [g for n in graph.node for a in n.attribute for g in a.graphs]
        custom = {n.domain for n in graph.node} - set(ONNX_DOMAINS)
        if custom:
            raise ExportError(f"{path} uses ops of unknown domains {sorted(custom)}")
    return model


class OnnxRunner:
    """An onnxruntime session as a callable on torch tensors (float logits back)."""

    def __init__(self, path_or_model, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads(threads)
        options.inter_op_num_threads = 1
        source = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) \
            else str(path_or_model)
        try:
            self.session = ort.InferenceSession(source, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / NotImplemented types
            message = " ".join(str(e).split())
            what = "the exported model" if isinstance(path_or_model, onnx.ModelProto) \
                else str(path_or_model)
            raise ExportError(f"onnxruntime cannot run {what}: {message[-300:]}") from None
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])
