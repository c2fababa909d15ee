"""Agreement of lowbit's integer-only engine and of its QDQ ONNX export (run in onnxruntime)
with the fake-quant simulation, on the full CIFAR-10 test set (ResNet-20; ResNet-32 beside it):
top-1 of each, top-1 agreement, and the logit differences in 8-bit output steps.

    python benchmarks/deploy_agreement.py [--models resnet20,resnet32] [--threads 1]

Targets (issue 5): integer engine top-1 agreement >= 99.9% for W8A8 and W4A4 ResNet-20, logits
within one output quantization step; onnxruntime top-1 within 0.1 points of the simulation.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy.integer import IntegerEngine
from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.evaluate import agreement

from ptq_ablation import commit, load_benchmark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deploy_agreement.json"
SETTINGS = {"W8A8": lowbit.PTQConfig(w_bits=8, a_bits=8),
            "W4A4 deploy recipe": lowbit.load_recipe("ptq-w4a4-deploy")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,resnet32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    results = {"meta": {"commit": commit(), "threads": args.threads,
                        "command": "python benchmarks/deploy_agreement.py"}}
    for name in args.models.split(","):
        model, calib, test = load_benchmark(name)
        for label, config in SETTINGS.items():
            q = lowbit.quantize(model, config, calib)
            runners = {"integer engine": IntegerEngine(q),
                       "onnxruntime": OnnxRunner(to_onnx(q, (1, 3, 32, 32)), args.threads)}
            for engine, runner in runners.items():
                t = time.perf_counter()
                row = agreement(q, runner, test)
                row["seconds"] = time.perf_counter() - t
                results.setdefault(name, {}).setdefault(label, {})[engine] = row
                print(name, label, engine, row, flush=True)
                RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
