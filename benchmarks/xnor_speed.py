"""XNOR-popcount speed (issue 17): the binary GEMM on every vector path this CPU has against
PyTorch's FP32 matmul at ResNet-20's shapes, and a whole XNOR ResNet-20 (binary inner layers,
8-bit first / last) at batch 128 and batch 1 against lowbit's int8 ResNet-20 (``ptq-int8-deploy``,
fully quantized, in onnxruntime and OpenVINO: the faster is the baseline) and FP32 eager, one
thread, interleaved rounds; plus the deployed XNOR network's agreement with its float simulation.

    python benchmarks/xnor_speed.py

Targets: binary GEMM >= 4x FP32 matmul on AVX2 and >= 6x on AVX-512; XNOR ResNet-20 >= 1.5x
lowbit int8 at batch 128 and batch 1, outputs equal to the float simulation. The GEMM times are
the kernel as the network calls it (float epilogue included). The network runs twice: with each
convolution's BatchNorm, residual add and next binary input fused into the kernel (``xnor
popcount``, :func:`lowbit.deploy.xnor.fuse_epilogues`) and with them as separate modules
(``unfused``). Training runs of the long benchmarks are paused (SIGSTOP, ``pause.py``) while
anything is timed; run it with no other benchmark on the machine. The table names the CPU's
instruction sets.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import xnor
from lowbit.deploy.bench import images_per_second
from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.deploy.openvino_runtime import OpenVinoRunner
from lowbit.errors import LowbitError
from lowbit.methods import training_method

from pause import paused  # noqa: E402
from ptq_ablation import commit, load_benchmark  # noqa: E402
from train_speed import cpu_description  # noqa: E402

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


def gemm_rows() -> dict:
    """Per shape: FP32 matmul seconds and the kernel's seconds on each vector path."""
    ext = xnor.extension()
    rows = {}
    for m, k, o in GEMMS:
        a, b = torch.randn(m, k), torch.randn(k, o)
        rows_, masks, valid = xnor.gemm_operands(xnor.pack_words(a >= 0), k)
        packed_b = xnor.pack_words(b.t() >= 0)
        ones, zeros, scale = torch.ones(o), torch.zeros(o), torch.ones(m)
        runs = {"fp32": lambda: a @ b}
        for path in xnor.supported_paths():
            runs[path] = lambda path=path: ext.popcount_gemm(rows_, masks, valid, packed_b, ones,
                                                              scale, zeros, m, path)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(5):  # interleaved
            for name, fn in runs.items():
                best[name] = min(best[name], best_time(fn, 3))
        rows[f"{m}x{k}x{o}"] = {"fp32_s": best.pop("fp32"), "paths_s": best}
        print("gemm", m, k, o, rows[f"{m}x{k}x{o}"], flush=True)
    return rows


def breakdown(run, batch: torch.Tensor, calls: int) -> dict:
    """Milliseconds per forward spent in each compiled function and in Python (cProfile's own
    time, the rest of the total), the largest first."""
    import cProfile
    import pstats

    run(batch)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        run(batch)
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, _, own s, total s, _)}
    own = {}
    for (file, _, name), (_, _, seconds, _, _) in stats.items():
        key = name if file == "~" else "python"  # "~": a built-in (compiled) function
        if file == xnor.__file__ and name == "forward":  # the kernel's pybind11 calls count here
            key = "popcount convolutions"
        own[key] = own.get(key, 0.0) + 1e3 * seconds / calls
    return dict(sorted(own.items(), key=lambda kv: -kv[1]))


def main():
    warnings.simplefilter("ignore", UserWarning)
    torch.set_num_threads(1)
    compiled = xnor.extension() is not None
    out = {"meta": {"commit": commit(), "command": "python benchmarks/xnor_speed.py",
                    "cpu": cpu_description(), "threads": 1, "compiled_kernel": compiled,
                    "kernel_path": xnor.kernel_path() if compiled else "torch"}}
    with paused() as stopped:
        out["gemm"] = gemm_rows() if compiled else {}
    out["meta"]["paused_training_runs"] = len(stopped)

    model, calib, test = load_benchmark("resnet20")
    x = next(iter(test))[0][:128]
    method = training_method("xnor", {})
    sim = method.prepare(copy.deepcopy(model).eval(), x[:8]).train()
    with torch.no_grad():
        sim(torch.cat([b[0] for b in calib])[:512])  # EMA ranges of the 8-bit first / last layer
    sim.eval()
    deployed = xnor.deploy_xnor(sim)
    # the same network without XNOR-Net's K (input_scale: false, Bi-Real / ReActNet's binary
    # convolution): integer sign thresholds inside each block
    no_k = training_method("xnor", {"input_scale": False}).prepare(copy.deepcopy(model).eval(),
                                                                    x[:8]).train()
    with torch.no_grad():
        no_k(torch.cat([b[0] for b in calib])[:512])
    no_k = xnor.deploy_xnor(no_k.eval())
    with torch.no_grad():
        a, b = sim(x), deployed(x)
    out["agreement"] = {"max_abs_diff": (a - b).abs().max().item(),
                        "logit_range": (a.max() - a.min()).item(),
                        "top1_equal": bool(torch.equal(a.argmax(1), b.argmax(1)))}
    int8 = lowbit.quantize(model, lowbit.load_recipe("ptq-int8-deploy"), calib)
    graph = to_onnx(int8, (1, 3, 32, 32), [x[:128]])
    runs = {"fp32 eager": model.eval(), "xnor simulation (float)": sim,
            "xnor popcount": deployed, "xnor popcount, unfused": xnor.deploy_xnor(sim, fuse=False),
            "xnor popcount, no K": no_k,
            "lowbit int8 (onnxruntime)": OnnxRunner(graph, 1)}
    try:
        runs["lowbit int8 (openvino)"] = OpenVinoRunner(graph, 1)
    except LowbitError as e:  # the optional runtime not installed: onnxruntime is the baseline
        print("no OpenVINO:", e, flush=True)
    with torch.no_grad(), paused():
        for batch in (128, 1):
            out[f"network_batch{batch}"] = images_per_second(runs, x[:batch], rounds=5)
            print(batch, out[f"network_batch{batch}"], flush=True)
            out[f"breakdown_batch{batch}"] = breakdown(deployed, x[:batch],
                                                       5 if batch > 1 else 300)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
