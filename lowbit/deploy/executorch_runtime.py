"""ExecuTorch with XNNPACK as a runtime for lowbit's fully quantized lowering (optional: the
``bench`` extra installs ``executorch``).

XNNPACK is the CPU backend PyTorch ships to phones; on small inputs at batch 1 its int8
convolutions beat onnxruntime's and OpenVINO's (``benchmarks/runtime_speed.py``). Its
partitioner takes the graph PT2E quantization produces: ``quantize_per_tensor ->
dequantize_per_tensor`` around every integer tensor and ``dequantize_per_channel`` on constant
int8 weights. :func:`to_executorch` writes exactly that from the :class:`Lowering` (the same
grids the simulation, the integer engine and the ONNX file read), through ``torch.export``, so
XNNPACK runs the tensors the simulation quantizes, on their grids:

* activation grids are written as int8 (XNNPACK's QS8): a uint8 grid's codes move by -128 with
  its zero point, the same ``q - Z``; XNNPACK's kernels use full 8-bit ranges, so a narrower
  grid (4-bit activations) is refused, by node;
* weights must be symmetric int8 per-channel codes in [-127, 127] (``ptq-int8-deploy``);
  biases are the float values of their int32 accumulator codes, which XNNPACK rounds back to the
  same codes;
* the output layer, whose int32 accumulator the lowering keeps, runs as XNNPACK's float
  linear on the integer input, with its dequantized weights (XNNPACK's static int8 linear needs
  an output grid);
* each consumer of a tensor gets its own ``dequantize_per_tensor``, as PT2E writes them (the
  partitioner matches one ``dq -> op -> q`` group per op).

A program is compiled for one input shape; :class:`ExecuTorchRunner` keeps one per batch size.
"""
from __future__ import annotations

import warnings
from dataclasses import astuple

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.deploy.lowering import Lowering, lower, with_grids
from lowbit.deploy.onnx_export import _ExportLayer, export_layers
from lowbit.errors import ConfigError, ExportError

__all__ = ["ExecuTorchRunner", "to_executorch"]


def _executorch():
    try:
        import executorch.exir  # noqa: F401
        import torchao.quantization.pt2e  # noqa: F401  (registers quantized_decomposed ops)
    except ImportError:
        raise ConfigError("ExecuTorch is not installed: pip install executorch (or lowbit's "
                          "extra: pip install -e \".[bench]\")") from None
    return torch.ops.quantized_decomposed


def _int8_grid(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[float, int]:
    """An 8-bit grid as int8 (scale, zero point): codes and zero point moved by -128 - qmin."""
    if qmax - qmin != 255:
        raise ExportError(f"XNNPACK runs full 8-bit activation grids; [{qmin}, {qmax}] is not one "
                          "(quantize activations at 8 bits for this runtime)")
    return scale, zero_point - 128 - qmin


def _qdq(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    qd = torch.ops.quantized_decomposed
    scale, zero = _int8_grid(scale, zero_point, qmin, qmax)
    codes = qd.quantize_per_tensor.default(x, scale, zero, -128, 127, torch.int8)
    return qd.dequantize_per_tensor.default(codes, scale, zero, -128, 127, torch.int8)


class _XnnpackLayer(nn.Module):
    """A quantized Conv / Linear as XNNPACK's partitioner reads it: the input on its grid,
    ``dequantize_per_channel`` of constant int8 weight codes, a float bias; or, for the output
    layer (``float_weights``), the dequantized weights."""

    def __init__(self, layer: _ExportLayer, name: str, float_weights: bool):
        super().__init__()
        self.input_grid, self.conv = layer.input_grid, layer.conv
        self.options = getattr(layer, "options", {})
        codes, zero = layer.weight_codes.long(), layer.weight_zero_point.long()
        if layer.weight_codes.dtype == torch.uint8:  # _ExportLayer's full-range int8 as uint8
            codes, zero = codes - 128, zero - 128
        if zero.any() or codes.min() < -127 or codes.max() > 127:
            raise ExportError(f"{name}: XNNPACK's int8 layers take symmetric weight codes in "
                              "[-127, 127] (w_symmetric: true, as ptq-int8-deploy)")
        if layer.gain:
            raise ExportError(f"{name}: a float weight correction has no XNNPACK form")
        shape = (-1,) + (1,) * (codes.dim() - 1)
        self.float_weights = float_weights
        if float_weights:
            self.register_buffer("weight", codes.float() * layer.weight_scale.reshape(shape))
        else:
            self.register_buffer("weight_codes", codes.to(torch.int8))
            self.register_buffer("weight_scale", layer.weight_scale.float().clone())
            self.register_buffer("weight_zero_point", torch.zeros_like(zero))
        if layer.bias_kind == "int32":
            bias = layer.bias_codes.double() * layer.bias_scale.double()
        elif layer.bias_kind == "float":
            bias = layer.bias.double()
        else:
            bias = None
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x):
        if self.input_grid is not None:
            x = _qdq(x, *astuple(self.input_grid))
        w = self.weight if self.float_weights else \
            torch.ops.quantized_decomposed.dequantize_per_channel.default(
                self.weight_codes, self.weight_scale, self.weight_zero_point, 0, -127, 127,
                torch.int8)
        if self.conv:
            return F.conv2d(x, w, self.bias, **self.options)
        return F.linear(x, w, self.bias)


def _one_dequantize_per_consumer(graph: torch.fx.Graph) -> None:
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == dequantize and len(node.users) > 1:
            for user in list(node.users)[1:]:
                with graph.inserting_after(node):
                    copy = graph.call_function(dequantize, node.args, node.kwargs)
                copy.meta = dict(node.meta)
                user.replace_input_with(node, copy)


def to_executorch(qmodel, input_shape, calib=None) -> bytes:
    """The ExecuTorch program (XNNPACK-delegated) of ``qmodel``'s fully quantized lowering, for
    inputs of exactly ``input_shape``. ``qmodel``: a quantized model (then ``calib`` batches
    are needed, as for :func:`lowbit.deploy.lower`) or a fully quantized :class:`Lowering`."""
    _executorch()
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    lowering = qmodel if isinstance(qmodel, Lowering) else lower(qmodel, calib)
    if not lowering.fully_quantized:
        raise ExportError("XNNPACK needs the fully quantized form: pass calibration batches")
    example = torch.zeros(input_shape)
    nodes = {n.target: n for n in lowering.graph_module.graph.nodes
             if lowering.kinds.get(n) == "layer"}
    layers = {name: _XnnpackLayer(layer, name, lowering.output_grid(nodes[name]) is None)
              for name, layer in export_layers(lowering).items()}
    module = with_grids(lowering, lambda graph, node, grid: graph.call_function(
        _qdq, (node, *astuple(grid))), layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module.eval(), (example,))
        _one_dequantize_per_consumer(program.graph_module.graph)
        program.graph_module.recompile()
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner(
            config_precisions=[ConfigPrecisionType.STATIC_QUANT, ConfigPrecisionType.FP32])])
        return edge.to_executorch().buffer


class ExecuTorchRunner:
    """A lowering run by ExecuTorch + XNNPACK as a callable on torch tensors (float logits): one
    program per batch size, built on first use (ExecuTorch programs have static shapes), or at
    once for ``input_shape``, so that a model XNNPACK cannot run is refused here."""

    def __init__(self, qmodel, calib=None, threads: int = 1, input_shape=None):
        _executorch()
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        from lowbit.devices import cpu_threads

        self.lowering = qmodel if isinstance(qmodel, Lowering) else lower(qmodel, calib)
        _unsafe_reset_threadpool(cpu_threads(threads))  # XNNPACK's pool is process-wide
        self.programs: dict[tuple, object] = {}
        if input_shape is not None:
            self._method(tuple(input_shape))

    def _method(self, shape: tuple):
        from executorch.runtime import Runtime

        if shape not in self.programs:
            program = Runtime.get().load_program(to_executorch(self.lowering, shape))
            # the method runs inside its program: keep the program alive with it
            self.programs[shape] = (program, program.load_method("forward"))
        return self.programs[shape][1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        return self._method(tuple(x.shape)).execute([x])[0].clone()
