"""PTQ cost on ResNet-20: calibration time and fake-quant vs FP evaluation, in one process.

    python benchmarks/ptq_speed.py [--threads 1,2] [--repeats 3]

Calibration = one ``lowbit.quantize`` call on 1,024 training images (BN folding, every pass,
finalization). Evaluation ratio = fake-quant time / FP time on the same 2,000 test images,
alternating FP and fake-quant runs and keeping each one's fastest (the machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import lowbit
from ptq_ablation import commit, load_benchmark

RESULTS = Path(__file__).resolve().parent / "results" / "ptq_speed.json"
RECIPES = {"W8A8 min-max": lowbit.PTQConfig(),
           "W4A4 Banner all combined": lowbit.load_recipe("ptq-w4a4-banner"),
           "W4A4 lowbit best": lowbit.load_recipe("ptq-w4a4-best"),
           "W4A4 lowbit per-tensor (deploy)": lowbit.load_recipe("ptq-w4a4-deploy")}


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    model, calib, test = load_benchmark("resnet20")
    calib, test = list(calib), list(test)[:4]  # 2,000 test images
    out = {"meta": {"commit": commit(), "command": "python benchmarks/ptq_speed.py",
                    "repeats": args.repeats, "test_images": 2000, "calib_images": 1024}}
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        rows = out[f"{threads} thread(s)"] = {}
        for label, config in RECIPES.items():
            calib_s = min(timed(lambda: lowbit.quantize(model, config, calib))
                          for _ in range(args.repeats))
            qmodel = lowbit.quantize(model, config, calib)
            fp_s, q_s = [], []
            for _ in range(args.repeats):
                fp_s.append(timed(lambda: lowbit.evaluate(model, test)))
                q_s.append(timed(lambda: lowbit.evaluate(qmodel, test)))
            rows[label] = {"calib_seconds": calib_s, "fp_eval_seconds": min(fp_s),
                           "q_eval_seconds": min(q_s), "eval_ratio": min(q_s) / min(fp_s)}
            print(f"{threads} thr  {label:34s} calib {calib_s:5.2f}s  eval ratio "
                  f"{min(q_s) / min(fp_s):4.2f}", flush=True)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
