"""Inference speed of lowbit's deployed int8 model against FP32 and the int8 peers, in one run.

Runners (each maps a float batch to logits):

* ``fp32 eager``: the float model in PyTorch.
* ``lowbit int8``: lowbit's PTQ model exported fully quantized (:func:`to_onnx` with
  ``calib``) and run by onnxruntime, whose QLinearConv / QLinearAdd kernels do the int8
  arithmetic: a real runtime underneath, with lowbit's calibration.
* ``pytorch fx int8``: PyTorch's own FX graph-mode PTQ (x86 backend qconfig, min-max observers)
  converted to its quantized kernels.
* ``onnxruntime qdq int8``: onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights,
  uint8 activations, min-max calibration) on the float model.
* Where OpenVINO is installed (:mod:`lowbit.deploy.openvino_runtime`): ``lowbit int8
  (openvino)``, the same QDQ file in OpenVINO; ``fp32 (openvino)``, the float model in
  OpenVINO; and, where NNCF is installed too, ``nncf int8 (openvino)``: ``nncf.quantize``
  (OpenVINO's own PTQ, default preset) on the float model, run in OpenVINO.
* Where torchao is installed: ``pytorch pt2e int8 (inductor)``, PyTorch 2's export-based PTQ
  with the x86 inductor quantizer, compiled by ``torch.compile`` (PyTorch's replacement for FX
  quantization; in torch 2.13 its quantizers live in torchao).
* Where ExecuTorch is installed: ``executorch fp32 (xnnpack)`` and ``executorch int8
  (xnnpack)`` (its XNNPACK quantizer, per-channel symmetric), the runtime PyTorch ships to
  phones, run by its Python bindings with the XNNPACK thread pool at ``threads``.
  Both export a static batch size (``torch.export`` specializes it), so each batch size is
  exported, calibrated and compiled on first use (:class:`PerBatchRunner`). And ``lowbit int8
  (xnnpack)``: lowbit's own fully quantized lowering on XNNPACK
  (:mod:`lowbit.deploy.executorch_runtime`), one program per batch size too.

Speed is images per second, best of several rounds, the runners interleaved round by round so a
noisy machine slows all of them alike; ratios are to FP32 eager measured in the same rounds.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.errors import LowbitError


def _batches_tensor(calib, limit: int = 512) -> torch.Tensor:
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
    return torch.cat(xs)[:limit]


def fx_int8(model, calib) -> torch.nn.Module:
    """PyTorch FX PTQ with the x86 backend's default qconfig, converted to quantized kernels."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    x = _batches_tensor(calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (x[:1],))
        with torch.no_grad():
            for chunk in x.split(128):
                prepared(chunk)
        return convert_fx(prepared).eval()


def _float_onnx(model, x: torch.Tensor) -> Path:
    """The float model as an ONNX file with a dynamic batch (PyTorch's exporter)."""
    path = Path(tempfile.mkdtemp()) / "fp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:1],), path, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    return path


def onnxruntime_qdq(model, calib, threads: int) -> OnnxRunner:
    """onnxruntime ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    x = _batches_tensor(calib)
    fp = _float_onnx(model, x)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": c.numpy()} for c in x.split(64)])

        def get_next(self):
            return next(self.batches, None)

    logging.disable(logging.WARNING)  # quantize_static's advice on pre-processing, on the root logger
    try:
        quantize_static(str(fp), str(fp.with_name("q.onnx")), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return OnnxRunner(fp.with_name("q.onnx"), threads)


def nncf_int8(model, calib, threads: int):
    """NNCF's ``nncf.quantize`` (default preset) on the float model in OpenVINO, run there."""
    import nncf
    import openvino

    from lowbit.deploy.openvino_runtime import OpenVinoRunner, read_model

    x = _batches_tensor(calib)
    batches = list(x.split(64))
    logging.disable(logging.INFO)  # nncf's progress bars and notices
    try:
        quantized = nncf.quantize(read_model(_float_onnx(model, x)),
                                  nncf.Dataset(batches, lambda b: b.numpy()),
                                  subset_size=len(batches))
    finally:
        logging.disable(logging.NOTSET)
    path = Path(tempfile.mkdtemp()) / "nncf.xml"
    openvino.save_model(quantized, str(path), compress_to_fp16=False)
    return OpenVinoRunner(path, threads)


RUNNERS = ("fp32 eager", "lowbit int8", "pytorch fx int8", "onnxruntime qdq int8",
           "lowbit int8 (openvino)", "fp32 (openvino)", "nncf int8 (openvino)",
           "pytorch pt2e int8 (inductor)", "executorch fp32 (xnnpack)",
           "executorch int8 (xnnpack)", "lowbit int8 (xnnpack)")
NEEDS = {"lowbit int8 (openvino)": ("openvino",), "fp32 (openvino)": ("openvino",),
         "lowbit int8 (xnnpack)": ("executorch", "torchao"),
         "nncf int8 (openvino)": ("openvino", "nncf"), "pytorch pt2e int8 (inductor)": ("torchao",),
         "executorch fp32 (xnnpack)": ("executorch",), "executorch int8 (xnnpack)": ("executorch",)}


def available_runners() -> list[str]:
    """The runners of the module docstring whose optional packages are installed."""
    return [name for name in RUNNERS
            if all(importlib.util.find_spec(pkg) for pkg in NEEDS.get(name, ()))]


def runners(model, qmodel, calib, input_shape, threads: int, names=None) -> dict:
    """The runners ``names`` (default: :func:`available_runners`), runtimes at ``threads``."""
    names = available_runners() if names is None else names
    lowbit_onnx = to_onnx(qmodel, input_shape, calib=[_batches_tensor(calib, 256)]) \
        if any(n.startswith("lowbit") for n in names) else None
    build = {
        "fp32 eager": lambda: model.eval(),
        "lowbit int8": lambda: OnnxRunner(lowbit_onnx, threads),
        "pytorch fx int8": lambda: fx_int8(model, calib),
        "onnxruntime qdq int8": lambda: onnxruntime_qdq(model, calib, threads),
        "lowbit int8 (openvino)": lambda: _openvino_runner(lowbit_onnx, threads),
        "fp32 (openvino)": lambda: _openvino_runner(
            _float_onnx(model, _batches_tensor(calib, 1)), threads),
        "nncf int8 (openvino)": lambda: nncf_int8(model, calib, threads),
        "pytorch pt2e int8 (inductor)": lambda: pt2e_x86_int8(model, calib),
        "executorch fp32 (xnnpack)": lambda: executorch_xnnpack(model, calib, threads, False),
        "executorch int8 (xnnpack)": lambda: executorch_xnnpack(model, calib, threads, True),
        "lowbit int8 (xnnpack)": lambda: _executorch_runner(qmodel, calib, input_shape,
                                                            threads)}
    built = {}
    for name in names:
        try:
            built[name] = build[name]()
        except LowbitError as e:  # a runtime that cannot run this model: the others still race
            if not name.startswith("lowbit"):
                raise
            warnings.warn(f"{name} skipped: {e}")
    return built


def _executorch_runner(qmodel, calib, input_shape, threads: int):
    from lowbit.deploy.executorch_runtime import ExecuTorchRunner
    return ExecuTorchRunner(qmodel, [_batches_tensor(calib, 256)], threads, input_shape)


def _openvino_runner(source, threads: int):
    from lowbit.deploy.openvino_runtime import OpenVinoRunner
    return OpenVinoRunner(source, threads)


class PerBatchRunner:
    """Calls ``build(n)`` once per input batch size ``n`` and runs the program it returns."""

    def __init__(self, build):
        self.build, self.programs = build, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) not in self.programs:
            self.programs[len(x)] = self.build(len(x))
        return self.programs[len(x)](x)


def _calibrated_pt2e(model, calib, n: int, quantizer):
    """``model`` exported at batch ``n``, prepared with ``quantizer``, calibrated on the
    calibration images in batches of ``n`` (wrapping around for the last), converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    x = _batches_tensor(calib, 256)
    x = torch.cat([x] * -(-n // len(x)))  # at least n images
    prepared = prepare_pt2e(torch.export.export(model.eval(), (x[:n],)).module(), quantizer)
    with torch.no_grad():
        for start in range(0, max(len(x) - n + 1, 1), n):
            prepared(x[start:start + n])
    return convert_pt2e(prepared)


def pt2e_x86_int8(model, calib) -> PerBatchRunner:
    """PT2E PTQ with the x86 inductor quantizer (default config), compiled by inductor."""
    import torch._inductor.config as inductor
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    inductor.freezing = True  # fold the quantized weights into constants, as x86 int8 needs
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config())

    def build(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.compile(_calibrated_pt2e(model, calib, n, quantizer))
    return PerBatchRunner(build)


def executorch_xnnpack(model, calib, threads: int, int8: bool) -> PerBatchRunner:
    """ExecuTorch with every supported op delegated to XNNPACK; int8 through its quantizer."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)

    def build(n):
        example = _batches_tensor(calib, n)[:n]
        source = model.eval()
        if int8:
            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True))
            source = _calibrated_pt2e(model, calib, n, quantizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = to_edge_transform_and_lower(torch.export.export(source, (example,)),
                                                  partitioner=[XnnpackPartitioner()])
            loaded = Runtime.get().load_program(program.to_executorch().buffer)
            method = loaded.load_method("forward")
        # the method runs inside its program: keep the program alive as long as the method
        return lambda x, program=loaded: method.execute([x.contiguous()])[0]
    return PerBatchRunner(build)


@torch.no_grad()
def images_per_second(runs: dict, batch: torch.Tensor, rounds: int = 5,
                      seconds: float = 1.0, left_out: dict | None = None) -> dict[str, float]:
    """Best images/s of each runner on ``batch``, interleaved over ``rounds``; each round runs
    a runner for about ``seconds``. A peer that fails on the model (PT2E's x86 quantizer on
    torchvision's ResNet-18, say) is removed from ``runs`` with a warning naming it and its
    error (also recorded in ``left_out``, name -> error, when given); lowbit's own runners fail
    loudly."""
    reps = {}
    for name, run in list(runs.items()):  # warm up, and size each round to about `seconds`
        try:
            run(batch)
        except Exception as e:  # a peer's own exporter or quantizer: any exception type
            if name.startswith("lowbit") or name == "fp32 eager":
                raise
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            warnings.warn(f"{name} left out: {why}")
            if left_out is not None:
                left_out[name] = why
            del runs[name]
            continue
        t = time.perf_counter()
        run(batch)
        reps[name] = max(1, round(seconds / max(time.perf_counter() - t, 1e-6)))
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                run(batch)
            best[name] = max(best[name], reps[name] * len(batch) / (time.perf_counter() - t))
    return best
