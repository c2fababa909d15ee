"""XNOR-popcount speed: the binary GEMM against PyTorch's FP32 matmul at ResNet-20's shapes, and
a whole XNOR ResNet-20 (binary inner layers, 8-bit first / last) at batch 128 against lowbit's
int8 ResNet-20 (onnxruntime) and FP32 eager, one thread, interleaved rounds; plus the deployed
XNOR network's agreement with its float simulation.

    python benchmarks/xnor_speed.py

Targets (issue 5): binary GEMM >= 8x FP32 matmul; XNOR ResNet-20 >= 1.5x lowbit int8 at batch
128, outputs equal to the float simulation. Run with no other benchmark on the machine.
"""
from __future__ import annotations

import copy
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import xnor
from lowbit.deploy.bench import images_per_second
from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.methods import training_method

from ptq_ablation import commit, load_benchmark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "xnor_speed.json"
# (pixels = 128 images x output positions, K = 9 x input channels, output channels)
GEMMS = [(128 * 32 * 32, 144, 16), (128 * 16 * 16, 288, 32), (128 * 8 * 8, 576, 64)]


def best_time(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    out = {"meta": {"commit": commit(), "command": "python benchmarks/xnor_speed.py",
                    "machine": platform.processor() or platform.machine(), "threads": 1,
                    "compiled_kernel": xnor.extension() is not None}, "gemm": {}}
    for m, k, o in GEMMS:
        a, b = torch.randn(m, k), torch.randn(k, o)
        operands = xnor.gemm_operands(xnor.pack_words(a >= 0), k)
        packed_b = xnor.pack_words(b.t() >= 0)
        fp, binary = [], []
        for _ in range(5):  # interleaved
            fp.append(best_time(lambda: a @ b, 3))
            binary.append(best_time(lambda: xnor.popcount_gemm(*operands, packed_b), 3))
        out["gemm"][f"{m}x{k}x{o}"] = {"fp32_s": min(fp), "binary_s": min(binary),
                                       "ratio": min(fp) / min(binary)}
        print("gemm", m, k, o, out["gemm"][f"{m}x{k}x{o}"], flush=True)

    model, calib, test = load_benchmark("resnet20")
    x = next(iter(test))[0][:128]
    method = training_method("xnor", {})
    sim = method.prepare(copy.deepcopy(model).eval(), x[:8]).train()
    with torch.no_grad():
        sim(torch.cat([b[0] for b in calib])[:512])  # EMA ranges of the 8-bit first / last layer
    sim.eval()
    deployed = xnor.deploy_xnor(sim)
    with torch.no_grad():
        a, b = sim(x), deployed(x)
    out["agreement"] = {"max_abs_diff": (a - b).abs().max().item(),
                        "logit_range": (a.max() - a.min()).item(),
                        "top1_equal": bool(torch.equal(a.argmax(1), b.argmax(1)))}
    int8 = lowbit.quantize(model, lowbit.load_recipe("ptq-int8-deploy"), calib)
    runs = {"fp32 eager": model.eval(), "xnor simulation (float)": sim,
            "xnor popcount": deployed,
            "lowbit int8 (onnxruntime)": OnnxRunner(to_onnx(int8, (1, 3, 32, 32),
                                                            [x[:128]]), 1)}
    out["network_batch128"] = images_per_second(runs, x, rounds=5)
    print(out["agreement"], out["network_batch128"], flush=True)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
