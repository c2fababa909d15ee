"""Inference speed on every CPU runtime lowbit targets or competes with, on real model sizes.

    python benchmarks/runtime_speed.py [--models resnet20,resnet18,mobilenet_v2,efficientnet_b0]
                                       [--threads 1,2] [--batch-sizes 1,128] [--rounds 3]

Runners: those of :mod:`lowbit.deploy.bench` whose packages are installed (FP32 eager; lowbit's
``ptq-int8-deploy`` model in onnxruntime and in OpenVINO; PyTorch FX x86 and PT2E x86-inductor
int8; onnxruntime ``quantize_static``; FP32 and NNCF int8 in OpenVINO; ExecuTorch XNNPACK FP32
and int8). ResNet-20 is the trained CIFAR-10 checkpoint, calibrated on 1,024 training images,
with each runner's top-1 on the full test set, plus lowbit's W4A8 model (``ptq-w4a4-deploy``
with 8-bit activations and symmetric weights) on the int8 kernels of onnxruntime and OpenVINO
(4-bit codes stored as int8, ``to_onnx(int8_weights=True)``), and its file sizes: packed
(4-bit codes), ONNX with INT4 weights, ONNX with int8 weights. The torchvision models run at 224 px with random
weights (batch-norm statistics settled on random images; speed only), calibrated on 128 random
images. Timing: images/s, best of ``--rounds`` interleaved rounds (``lowbit.deploy.bench``),
training runs paused. Results: benchmarks/results/runtime_speed.json (per model, resumable),
each with the CPU's instruction sets.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.deploy.bench import _batches_tensor, images_per_second, runners
from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.deploy.openvino_runtime import OpenVinoRunner
from lowbit.methods.mixed_precision import layer_shapes
from lowbit.report import quantized_size_bytes
from calib_memory import RandomImages, settled
from pause import paused
from ptq_ablation import commit, load_benchmark, record
from train_speed import cpu_description

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_speed.json"
W4A8 = lowbit.load_recipe("ptq-w4a4-deploy", a_bits=8, w_symmetric=True)


def sub_byte(model, calib, shape, row: dict):
    """lowbit's W4A8 model on int8 kernels: runners (onnxruntime, OpenVINO) and file sizes."""
    q = lowbit.quantize(model, W4A8, calib)
    sample = [torch.cat([b[0] for b in calib])[:256]]
    four, eight = (to_onnx(q, shape, calib=sample, int8_weights=w) for w in (False, True))
    row["w4a8_bytes"] = {"packed codes": quantized_size_bytes(q),
                         "onnx int4 weights": len(four.SerializeToString()),
                         "onnx int8 weights": len(eight.SerializeToString())}
    return q, lambda threads: {"lowbit w4a8 int8 kernels": OnnxRunner(eight, threads),
                               "lowbit w4a8 int8 kernels (openvino)":
                                   OpenVinoRunner(eight, threads)}


def macs_per_image(model, shape) -> int:
    """Multiply-accumulates of one image through the model's Conv2d / Linear layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(s.macs for s in layer_shapes(model, names, torch.zeros(shape)).values())


def openvino_profile(onnx_model, shape, repeats: int = 500) -> dict[str, float]:
    """Microseconds per image that OpenVINO's execution graph spends in each layer type
    (its PERF_COUNT counters, one thread, static shape ``shape``; the last of ``repeats``
    inferences)."""
    import openvino as ov

    model = ov.Core().read_model(onnx_model.SerializeToString())
    model.reshape({model.inputs[0]: list(shape)})
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = torch.rand(shape).numpy()
    for _ in range(repeats):
        request.infer({0: x})
    times: dict[str, float] = {}
    for layer in request.get_profiling_info():
        if layer.status == layer.Status.EXECUTED:
            seconds = layer.real_time.total_seconds()
            times[layer.node_type] = times.get(layer.node_type, 0.0) + 1e6 * seconds / shape[0]
    return times


def load(name: str):
    """(float model, calibration batches, test batches or None, input shape)."""
    if name == "resnet20":
        model, calib, test = load_benchmark(name)
        return model, list(calib), test, (1, 3, 32, 32)
    return settled(name).eval(), list(RandomImages(128)), None, (1, 3, 224, 224)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,resnet18,mobilenet_v2,efficientnet_b0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch-sizes", default="1,128")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    command = "python benchmarks/runtime_speed.py " + " ".join(sys.argv[1:])
    record(RESULTS, "meta", None, {"commit": commit(), "cpu": cpu_description(),
                                   "command": command.strip(), "rounds": args.rounds})
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with paused():
        for name in args.models.split(","):
            model, calib, test, shape = load(name)
            start = time.perf_counter()
            qmodel = lowbit.quantize(model, lowbit.load_recipe("ptq-int8-deploy"), calib)
            row = {"commit": commit(), "cpu": cpu_description(), "input": list(shape[1:]),
                   "command": command.strip(), "calib_seconds": time.perf_counter() - start,
                   "macs": macs_per_image(model, shape), "timing": {},
                   "openvino_us_batch1": openvino_profile(
                       to_onnx(qmodel, shape, calib=[_batches_tensor(calib, 256)]), shape)}
            w4, extra = sub_byte(model, calib, shape, row) if test is not None else (None, None)
            for threads in map(int, args.threads.split(",")):
                torch.set_num_threads(threads)
                runs = runners(model, qmodel, calib, shape, threads)
                runs.update(extra(threads) if extra else {})
                row["precisions"] = {k: r.precisions() for k, r in runs.items()
                                     if hasattr(r, "precisions")}
                if test is not None and "top1" not in row:
                    row["top1"] = {k: lowbit.evaluate(r, test) for k, r in runs.items()}
                    row["top1"]["lowbit simulation"] = lowbit.evaluate(qmodel, test)
                    row["top1"]["lowbit w4a8 simulation"] = lowbit.evaluate(w4, test)
                for size in sizes:
                    x = _batches_tensor(calib, size)
                    x = torch.cat([x] * -(-size // len(x)))[:size]
                    speed = images_per_second(runs, x, args.rounds,
                                              left_out=row.setdefault("left_out", {}))
                    row["timing"][f"threads={threads} batch={size}"] = speed
                    base = speed["fp32 eager"]
                    print(name, threads, size, {k: f"{v / base:.2f}x" for k, v in speed.items()},
                          flush=True)
                    record(RESULTS, name, None, row)


if __name__ == "__main__":
    main()
