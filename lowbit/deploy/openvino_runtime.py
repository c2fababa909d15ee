"""OpenVINO as a runtime for lowbit's QDQ ONNX export (optional: ``pip install -e ".[openvino]"``).

OpenVINO (Intel's inference engine; its CPU plugin runs on any x86-64 CPU, AVX2 included) reads
the QDQ ONNX file :func:`lowbit.deploy.onnx_export.to_onnx` writes, as it is: no second
exporter. Its low-precision transformations turn each ``DequantizeLinear -> Conv`` with
``QuantizeLinear`` inputs into an integer convolution, but only where the weights are
symmetric (every weight zero point 0). With asymmetric weights (``ptq-w8a8``'s per-channel
min-max) it dequantizes them and runs the convolution in f32, so it computes the simulation's
numbers at float speed. ``ptq-int8-deploy`` (symmetric 7-bit weights) runs in u8 / i8.
:meth:`OpenVinoRunner.precisions` reads the compiled model's execution graph (each layer's
``runtimePrecision``), so benchmarks and ``lowbit bench-infer`` say which layers ran in int8
instead of assuming it.

Float layers run in f32 (``INFERENCE_PRECISION_HINT``). Left to itself, OpenVINO picks bf16 on
CPUs with AVX-512 BF16 or AMX, which would change the logits against lowbit's simulation.

``lowbit export --format openvino`` writes OpenVINO's IR (``.xml`` + ``.bin``, weights kept at
their precision, not compressed to fp16), which loads without the ONNX frontend; ``lowbit eval``
and ``bench-infer`` take either the IR or the ONNX file.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import onnx
import torch

from lowbit.devices import cpu_threads
from lowbit.errors import ConfigError, ExportError

INT8 = ("u8", "i8")
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")
STATIC_SHAPES = 8  # batch sizes compiled as static shapes before falling back to the dynamic model


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ConfigError("OpenVINO is not installed: pip install openvino "
                          "(or lowbit's extra: pip install -e \".[openvino]\")") from None
    return openvino


def read_model(source):
    """An OpenVINO model from an ONNX ``ModelProto``, an ``.onnx`` file or an IR ``.xml``."""
    ov = _openvino()
    core = ov.Core()
    try:
        if isinstance(source, onnx.ModelProto):
            return core.read_model(source.SerializeToString())
        return core.read_model(str(source))
    except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
        what = "the exported model" if isinstance(source, onnx.ModelProto) else str(source)
        raise ExportError(f"OpenVINO cannot read {what}: {' '.join(str(e).split())[-300:]}") \
            from None


def save_openvino(source, out: Path) -> Path:
    """Write ``source`` (as :func:`read_model` takes) as OpenVINO IR ``out`` (``.xml``, the
    weights in the ``.bin`` beside it). Both are written under temporary names and renamed
    into place, so an existing pair is replaced whole or not at all."""
    ov = _openvino()
    out = Path(out)
    if out.suffix != ".xml":
        raise ConfigError(f"an OpenVINO IR file ends in .xml, got {out}")
    model = read_model(source)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return out


class OpenVinoRunner:
    """A model compiled by OpenVINO for the CPU, as a callable on torch tensors (float logits).

    ``threads``: OpenVINO's inference threads. ``batch``:
    * None (default): a static-shape model per batch size, each compiled the first time that
      batch size is run (up to :data:`STATIC_SHAPES` sizes; further sizes share one
      dynamic-batch model). OpenVINO's CPU plugin picks its kernels and memory plan for a
      static shape at compile time; with a dynamic batch it re-plans on each call, which was
      clearly slower on ResNet-20 at batch 1 (measured by hand, not by a committed benchmark).
    * an int N: one static model for N; shorter batches are zero-padded (their rows dropped from
      the output), longer ones split.
    * ``"dynamic"``: the file's dynamic batch dimension, one compiled model for every size.

    Inputs are handed to OpenVINO without a copy (``share_inputs``); the logits are copied out
    of the request's buffer, which the next call overwrites.
    """

    def __init__(self, source, threads: int = 1, batch: int | str | None = None):
        if not (batch is None or batch == "dynamic" or (isinstance(batch, int) and batch > 0)):
            raise ConfigError(f"batch must be a positive int, None or 'dynamic', got {batch!r}")
        self.threads = cpu_threads(threads)
        self.model = read_model(source)
        self.batch = batch
        self.requests: dict[int | None, object] = {}  # batch size (None: dynamic) -> request
        self.compiled = self._compile(batch if isinstance(batch, int) else None)

    def _compile(self, size: int | None):
        """Compile the model for a static batch ``size`` (None: the dynamic batch), keep an
        infer request for it, and return the compiled model."""
        model = self.model
        if size is not None:
            model = model.clone()
            shape = model.inputs[0].get_partial_shape()
            shape[0] = size
            model.reshape({model.inputs[0]: shape})
        try:
            compiled = _openvino().Core().compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:
            raise ExportError(f"OpenVINO cannot compile the model: "
                              f"{' '.join(str(e).split())[-300:]}") from None
        self.requests[size] = compiled.create_infer_request()
        return compiled

    def _request(self, n: int):
        if isinstance(self.batch, int):
            return self.requests[self.batch]
        if n not in self.requests:
            if self.batch == "dynamic" or len(self.requests) - 1 >= STATIC_SHAPES:
                return self.requests[None]  # the dynamic model, always compiled
            self._compile(n)
        return self.requests[n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if isinstance(self.batch, int) and n > self.batch:
            return torch.cat([self(part) for part in x.split(self.batch)])
        x = x.detach().float()
        if isinstance(self.batch, int) and n < self.batch:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, self.batch - n))
        request = self._request(len(x))
        request.infer({0: x.contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())[:n]

    def precisions(self) -> dict[str, dict[str, int]]:
        """For each layer type of the execution graph that does the multiply-adds (convolution,
        fully connected, matmul): how many layers ran at each precision."""
        counts: dict[str, Counter] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else ""
            if kind in COMPUTE_LAYERS:
                precision = info["runtimePrecision"].astype(str)
                counts.setdefault(kind, Counter())[precision] += 1
        return {kind: dict(c) for kind, c in counts.items()}

    def int8_share(self) -> float:
        """The fraction of the compute layers (:meth:`precisions`) that ran in u8 / i8."""
        counts = self.precisions()
        total = sum(sum(c.values()) for c in counts.values())
        int8 = sum(n for c in counts.values() for p, n in c.items() if p.lower() in INT8)
        return int8 / total if total else 0.0
