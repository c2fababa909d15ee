"""QDQ ONNX export of a quantized model, run and checked in onnxruntime.

The exported graph is the simulation written in ONNX operators, node for node of the traced
model: every quantized layer input becomes ``QuantizeLinear -> DequantizeLinear`` with the
layer's per-tensor scale and zero point, every weight an integer initializer (its real width:
INT4 / UINT4 up to 4 bits, 8-bit or 16-bit types above; full-range int8 weights as uint8 with
zero point 128, see :func:`_qdq_weight`) behind a per-channel ``DequantizeLinear``, every bias an int32 initializer at the accumulator scale ``S_W * S_X``
behind its own ``DequantizeLinear`` (the grid :func:`lowbit.nn.accumulator.round_biases` puts
it on), then ``Conv`` / ``Gemm``, and the float ops in between (``Relu``, ``Add``, ``Slice``,
``Pad``, pooling, reshapes). Integer ranges narrower than their ONNX type (3-bit codes, the
restricted signed range, per-channel bit widths) get a ``Clip`` on the integers between
``QuantizeLinear`` and ``DequantizeLinear``, so onnxruntime quantizes exactly as the simulation.

onnx builds the graph (``onnx.helper``); tracing, not ``torch.onnx.export``, decides the nodes,
because lowbit's quantizers are modules holding qparams, which an exporter would either trace
into float arithmetic or need a custom symbolic for each.
"""
from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn import functional as F

from lowbit.errors import ExportError
from lowbit.io import atomic_write
from lowbit.nn.accumulator import accumulator_scale
from lowbit.nn.layers import QUANT_LAYERS, QuantConv2d
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer, affine_part
from lowbit.transforms.fold import trace

OPSET = 21  # INT4 / UINT4 QuantizeLinear and DequantizeLinear
IR_VERSION = 10  # what opset 21 needs; onnx's default (its newest) may be newer than the runtime
_RELU = {F.relu, torch.relu}
_ADD = {operator.add, torch.add, operator.iadd}


def _integer_type(qmin: int, qmax: int, four_bit: bool = True):
    """(ONNX type, numpy dtype, type min, type max): the narrowest QDQ type holding [qmin, qmax]
    (4-bit types only if ``four_bit``)."""
    four = ((TensorProto.UINT4, np.uint8, 0, 15), (TensorProto.INT4, np.int8, -8, 7))
    for onnx_type, dtype, lo, hi in (*(four if four_bit else ()),
                                     (TensorProto.UINT8, np.uint8, 0, 255),
                                     (TensorProto.INT8, np.int8, -128, 127),
                                     (TensorProto.UINT16, np.uint16, 0, 65535),
                                     (TensorProto.INT16, np.int16, -32768, 32767)):
        if lo <= qmin and qmax <= hi:
            return onnx_type, dtype, lo, hi
    raise ExportError(f"integer range [{qmin}, {qmax}] fits no ONNX quantized type")


class _Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array, onnx_type=None) -> str:
        name = self.name(hint)
        array = np.asarray(array)
        if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
            tensor = helper.make_tensor(name, onnx_type, array.shape, array.flatten().tolist())
        else:
            tensor = onnx.numpy_helper.from_array(array, name)
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _qdq_input(b: _Builder, x: str, q: AffineQuantizer, name: str) -> str:
    if q.scale.dim():
        raise ExportError(f"{name}: per-channel activation scales have no QDQ Conv form; "
                          "quantize with a_per_channel: false")
    qmin, qmax, zero = int(q.quant_min), int(q.quant_max), int(q.zero_point)
    onnx_type, dtype, lo, hi = _integer_type(qmin, qmax)
    if (qmin, qmax) != (lo, hi):  # narrower than its type: a Clip, which has no 4-bit form
        onnx_type, dtype, lo, hi = _integer_type(qmin, qmax, four_bit=False)
    scale = b.const(f"{name}.input_scale", np.float32(q.scale.item()))
    zp = b.const(f"{name}.input_zero_point", np.array(zero, dtype=dtype), onnx_type)
    codes = b.op("QuantizeLinear", [x, scale, zp], f"{name}.input_q")
    if (qmin, qmax) != (lo, hi):
        codes = b.op("Clip", [codes, b.const("qmin", np.array(qmin, dtype=dtype)),
                              b.const("qmax", np.array(qmax, dtype=dtype))], f"{name}.input_clip")
    return b.op("DequantizeLinear", [codes, scale, zp], f"{name}.input_dq")


def _qdq_weight(b: _Builder, layer, name: str) -> str:
    slot = layer.weight_quantizer
    q = affine_part(slot)
    if q is None:
        raise ExportError(f"{name}: {type(slot).__name__} weights have no QDQ form (affine "
                          "integer codes only)")
    if not q.calibrated:
        raise ExportError(f"{name}: the weight quantizer was never calibrated")
    w = layer.weight.detach()
    rows = w.shape[0]
    codes = q.codes(w).to(torch.int64).numpy()
    qmin, qmax = int(q.quant_min.min()), int(q.quant_max.max())
    onnx_type, dtype, _, _ = _integer_type(qmin, qmax)
    scale = q.scale.float().expand(rows) if q.scale.dim() == 0 else q.scale.float()
    zero = q.zero_point.expand(rows) if q.zero_point.dim() == 0 else q.zero_point
    if onnx_type == TensorProto.INT8 and (qmin < -64 or qmax > 63):
        # x86 CPUs without AVX-512 VNNI multiply uint8 x int8 in pairs summed in saturating int16
        # (vpmaddubsw): 255 * 127 * 2 overflows, and onnxruntime's fused QLinearConv is then
        # wrong by several steps. uint8 codes with zero point 128 are the same q - Z, exactly,
        # and take the uint8 x uint8 kernel, which does not saturate.
        codes, zero, onnx_type, dtype = codes + 128, zero + 128, TensorProto.UINT8, np.uint8
    weight = b.op("DequantizeLinear", [
        b.const(f"{name}.weight_codes", codes.astype(dtype), onnx_type),
        b.const(f"{name}.weight_scale", scale.numpy()),
        b.const(f"{name}.weight_zero_point", zero.numpy().astype(dtype), onnx_type)],
        f"{name}.weight", axis=0)
    if isinstance(slot, CorrectedQuantizer) and slot.gain.numel():
        shape = (-1,) + (1,) * (w.dim() - 1)
        weight = b.op("Mul", [weight, b.const(f"{name}.gain",
                                               slot.gain.reshape(shape).float().numpy())],
                      f"{name}.weight_gain")
        weight = b.op("Add", [weight, b.const(f"{name}.shift",
                                               slot.shift.reshape(shape).float().numpy())],
                      f"{name}.weight_shift")
    return weight


def _bias(b: _Builder, layer, name: str) -> list[str]:
    if layer.bias is None:
        return []
    scale = accumulator_scale(layer)
    if scale is None:  # no integer accumulator (e.g. a float input): a float bias
        return [b.const(f"{name}.bias", layer.bias.detach().float().numpy())]
    codes = torch.round(layer.bias.detach().double() / scale).to(torch.int32).numpy()
    return [b.op("DequantizeLinear", [b.const(f"{name}.bias_codes", codes),
                                      b.const(f"{name}.bias_scale", scale.float().numpy()),
                                      b.const(f"{name}.bias_zero", np.zeros_like(codes))],
                 f"{name}.bias", axis=0)]


def _layer(b: _Builder, layer, x: str, name: str) -> str:
    q = layer.input_quantizer
    if isinstance(q, AffineQuantizer):
        if not q.calibrated:
            raise ExportError(f"{name}: the input quantizer was never calibrated")
        x = _qdq_input(b, x, q, name)
    elif not isinstance(q, nn.Identity):
        raise ExportError(f"{name}: {type(q).__name__} inputs have no QDQ form")
    weight = _qdq_weight(b, layer, name)
    if isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ExportError(f"{name}: padding {layer.padding!r} / {layer.padding_mode} is not "
                              "exported (numeric zero padding only)")
        ph, pw = layer.padding
        return b.op("Conv", [x, weight, *_bias(b, layer, name)], name,
                    strides=list(layer.stride), pads=[ph, pw, ph, pw],
                    dilations=list(layer.dilation), group=layer.groups,
                    kernel_shape=list(layer.kernel_size))
    return b.op("Gemm", [x, weight, *_bias(b, layer, name)], name, transB=1)


def _slice(b: _Builder, x: str, index, name: str) -> str:
    index = index if isinstance(index, tuple) else (index,)
    starts, ends, axes, steps = [], [], [], []
    for axis, s in enumerate(index):
        if not isinstance(s, slice):
            raise ExportError(f"{name}: only slice indexing is exported, got {s!r}")
        if s == slice(None):
            continue
        starts.append(s.start or 0)
        ends.append(s.stop if s.stop is not None else np.iinfo(np.int64).max)
        axes.append(axis)
        steps.append(s.step or 1)
    ints = lambda v: b.const("slice", np.array(v, dtype=np.int64))  # noqa: E731
    return b.op("Slice", [x, ints(starts), ints(ends), ints(axes), ints(steps)], name)


def _pad(b: _Builder, x: str, pad, rank: int, name: str) -> str:
    """torch's (last-dim begin, end, previous-dim begin, end, ...) -> ONNX (begins..., ends...)."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return b.op("Pad", [x, b.const("pads", np.array(begins + ends, dtype=np.int64))], name,
                mode="constant")


def to_onnx(qmodel: nn.Module, input_shape, residual_calib=None) -> onnx.ModelProto:
    """The QDQ ONNX model of ``qmodel`` for inputs of ``input_shape`` (any batch size).

    By default the graph is the simulation exactly: residual adds in float. With
    ``residual_calib`` (input batches) it is *fully quantized*, as integer runtimes need to run
    every op in int8: the output of each residual add (after its ReLU) and each layer output that
    feeds an add get a uint8 ``QuantizeLinear -> DequantizeLinear``, with the qparams of the
    8-bit layer input it feeds if there is one (then the pair is the simulation's own rounding),
    else a min-max range over ``residual_calib``. That rounding of the residual path is the one
    place this graph departs from the simulation; benchmarks report its accuracy.
    """
    traced, reason = trace(qmodel)
    if traced is None:
        raise ExportError(f"the model cannot be traced, so it cannot be exported: {reason}")
    modules = dict(traced.named_modules())
    with torch.no_grad():
        shapes = _observe(traced, [torch.zeros(1, *input_shape[1:])])[0]
    requantize = {}
    if residual_calib is not None:
        points = _residual_points(traced.graph, modules)
        roots = set(points.values())
        with torch.no_grad():
            _, ranges = _observe(traced, residual_calib, roots)
        params = {root: _residual_qparams(root, modules, *ranges[root]) for root in roots}
        requantize = {node: params[root] for node, root in points.items()}
    b, env = _Builder(), {}
    graph_input = helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                ["batch", *input_shape[1:]])
    output = None
    for node in traced.graph.nodes:
        args = [env.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            env[node] = "input"
        elif node.op == "output":
            output, out_shape = args[0], ["batch", *shapes[node.args[0]].shape[1:]]
        elif isinstance(module, QUANT_LAYERS):
            env[node] = _layer(b, module, args[0], node.target)
        else:
            env[node] = _other(b, node, module, args, shapes)
        if node in requantize:
            env[node] = _qdq(b, env[node], *requantize[node], f"{node.name}.residual")
    out_info = helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(b.nodes, "lowbit", [graph_input], [out_info], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lowbit", ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _is_relu(node, modules) -> bool:
    return (node.op == "call_function" and node.target in _RELU) or \
        (node.op == "call_method" and node.target in ("relu", "relu_")) or \
        (node.op == "call_module" and isinstance(modules[node.target], nn.ReLU))


def _residual_points(graph, modules) -> dict:
    """The float tensors of residual paths, each mapped to the tensor whose qparams it takes:
    each add's output (its ReLU's, if that is its only user) and, followed back through slicing,
    padding and identities, what each add adds. Slices and pads of a quantized tensor take its
    qparams (zero padding is exact: 0 is on every grid), so the runtime adds integers. Global
    average pooling outputs too (with the classifier's input qparams they cost nothing)."""
    points = {}
    for node in graph.nodes:
        if not (node.op == "call_function" and node.target in _ADD):
            continue
        users = list(node.users)
        out = users[0] if len(users) == 1 and _is_relu(users[0], modules) else node
        points[out] = out
        for operand in node.args[:2]:
            chain = []
            while isinstance(operand, torch.fx.Node) and (
                    (operand.op == "call_function" and operand.target in (operator.getitem, F.pad))
                    or (operand.op == "call_module"
                        and isinstance(modules[operand.target], nn.Identity))):
                chain.append(operand)
                operand = operand.args[0]
            if isinstance(operand, torch.fx.Node) and operand.op != "placeholder":
                points[operand] = operand
                points.update((link, operand) for link in chain
                              if link.op == "call_function" and link.target is F.pad)
    for node in graph.nodes:  # pooled features, so the runtime pools integers
        module = modules.get(node.target) if node.op == "call_module" else None
        if (node.op == "call_function" and node.target is F.adaptive_avg_pool2d) or \
                isinstance(module, nn.AdaptiveAvgPool2d) or \
                (node.op == "call_method" and node.target == "mean"):
            points[node] = node
            pooled = node.args[0]  # and what is pooled: a ReLU of a layer, say
            if isinstance(pooled, torch.fx.Node) and pooled.op != "placeholder":
                points.setdefault(pooled, pooled)
    return points


def _consumers(node, modules):
    """``node``'s users, looking through flatten / view / reshape."""
    for user in node.users:
        if (user.op == "call_method" and user.target in ("flatten", "view", "reshape")) or \
                (user.op == "call_function" and user.target is torch.flatten) or \
                (user.op == "call_module" and isinstance(modules[user.target], nn.Flatten)):
            yield from _consumers(user, modules)
        else:
            yield user


def _residual_qparams(node, modules, lo: float, hi: float):
    """(scale, zero point) of uint8 for a residual tensor: an 8-bit consumer's, else min-max."""
    for user in _consumers(node, modules):
        q = getattr(modules.get(user.target), "input_quantizer", None) \
            if user.op == "call_module" else None
        if isinstance(q, AffineQuantizer) and q.calibrated and q.scale.dim() == 0 and \
                (int(q.quant_min), int(q.quant_max)) == (0, 255):
            return float(q.scale), int(q.zero_point)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _qdq(b: _Builder, x: str, scale: float, zero: int, name: str) -> str:
    scale_name = b.const(f"{name}_scale", np.float32(scale))
    zp = b.const(f"{name}_zero_point", np.array(zero, dtype=np.uint8))
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale_name, zp], f"{name}_q"),
                                     scale_name, zp], f"{name}_dq")


def _other(b: _Builder, node, module, args, shapes) -> str:
    """The ONNX form of a non-layer node, or an ExportError naming it."""
    x = args[0] if args else None
    if isinstance(module, nn.Identity) or (node.op == "call_method"
                                           and node.target == "contiguous"):
        return x
    if (node.op == "call_function" and node.target in _RELU) or isinstance(module, nn.ReLU) \
            or (node.op == "call_method" and node.target in ("relu", "relu_")):
        return b.op("Relu", [x], node.name)
    if node.op == "call_function" and node.target in _ADD:
        return b.op("Add", args[:2], node.name)
    if (node.op == "call_function" and node.target is F.adaptive_avg_pool2d
            and tuple(np.atleast_1d(args[1])) in ((1,), (1, 1))) or \
            (isinstance(module, nn.AdaptiveAvgPool2d)
             and tuple(np.atleast_1d(module.output_size)) in ((1,), (1, 1))):
        return b.op("GlobalAveragePool", [x], node.name)
    if node.op == "call_method" and node.target == "mean":
        dims = tuple(args[1] if len(args) > 1 else node.kwargs.get("dim"))
        keep = bool(node.kwargs.get("keepdim", False))
        if dims in ((2, 3), (-2, -1)) and len(shapes[node.args[0]].shape) == 4:
            pooled = b.op("GlobalAveragePool", [x], node.name)  # integer runtimes have this one
            return pooled if keep else b.op("Flatten", [pooled], f"{node.name}_flat", axis=1)
        return b.op("ReduceMean", [x, b.const("axes", np.array(dims, dtype=np.int64))],
                    node.name, keepdims=int(keep))
    if isinstance(module, nn.MaxPool2d) and not module.ceil_mode and module.dilation in (1, (1, 1)):
        k, s, p = (np.broadcast_to(v, 2).tolist() for v in
                   (module.kernel_size, module.stride, module.padding))
        return b.op("MaxPool", [x], node.name, kernel_shape=k, strides=s, pads=p + p)
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten") or \
            isinstance(module, nn.Flatten):
        start = module.start_dim if module is not None else (args[1] if len(args) > 1 else 0)
        if start != 1 or len(shapes[node].shape) != 2:
            raise ExportError(f"{node.name}: only flatten(1) to a matrix is exported")
        return b.op("Flatten", [x], node.name, axis=1)
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = [-1, *shapes[node].shape[1:]]
        return b.op("Reshape", [x, b.const("shape", np.array(shape, dtype=np.int64))], node.name)
    if node.op == "call_function" and node.target is operator.getitem:
        return _slice(b, x, args[1], node.name)
    if node.op == "call_function" and node.target is F.pad and \
            node.kwargs.get("mode", "constant") == "constant" and not node.kwargs.get("value"):
        return _pad(b, x, args[1], len(shapes[node.args[0]].shape), node.name)
    what = type(module).__name__ if module is not None else \
        getattr(node.target, "__name__", str(node.target))
    raise ExportError(f"{node.name}: {what} has no ONNX export in lowbit")


def _observe(traced, inputs, nodes=()) -> tuple[dict, dict]:
    """Run ``traced`` on each input batch: (every node's output on the last batch, the running
    (min, max) of each of ``nodes``)."""
    outputs, ranges = {}, {}
    interpreter = torch.fx.Interpreter(traced)
    original = interpreter.run_node

    def record(node):
        outputs[node] = value = original(node)
        if node in nodes:
            lo, hi = ranges.get(node, (float("inf"), float("-inf")))
            ranges[node] = (min(lo, value.min().item()), max(hi, value.max().item()))
        return value

    interpreter.run_node = record
    for batch in inputs:
        interpreter.run(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return outputs, ranges


def export_onnx(qmodel: nn.Module, path, input_shape, residual_calib=None) -> Path:
    """Write ``qmodel`` as a QDQ ONNX file (atomically; see :func:`to_onnx`); returns the path."""
    model = to_onnx(qmodel, input_shape, residual_calib)
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
        options.intra_op_num_threads = threads
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
