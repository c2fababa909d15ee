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


def runners(model, qmodel, calib, input_shape, threads: int) -> dict:
    """The runners of the module docstring (runtimes at ``threads``)."""
    lowbit_onnx = to_onnx(qmodel, input_shape, calib=[_batches_tensor(calib, 256)])
    runs = {"fp32 eager": model.eval(),
            "lowbit int8": OnnxRunner(lowbit_onnx, threads),
            "pytorch fx int8": fx_int8(model, calib),
            "onnxruntime qdq int8": onnxruntime_qdq(model, calib, threads)}
    if importlib.util.find_spec("openvino"):
        from lowbit.deploy.openvino_runtime import OpenVinoRunner

        runs["lowbit int8 (openvino)"] = OpenVinoRunner(lowbit_onnx, threads)
        runs["fp32 (openvino)"] = OpenVinoRunner(_float_onnx(model, _batches_tensor(calib, 1)),
                                                 threads)
        if importlib.util.find_spec("nncf"):
            runs["nncf int8 (openvino)"] = nncf_int8(model, calib, threads)
    return runs


@torch.no_grad()
def images_per_second(runs: dict, batch: torch.Tensor, rounds: int = 5,
                      seconds: float = 1.0) -> dict[str, float]:
    """Best images/s of each runner on ``batch``, interleaved over ``rounds``; each round runs
    a runner for about ``seconds``."""
    reps = {}
    for name, run in runs.items():  # warm up, and size each round to about `seconds`
        run(batch)
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
