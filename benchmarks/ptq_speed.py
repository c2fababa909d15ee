"""PTQ cost on ResNet-20: calibration time and fake-quant vs FP evaluation, in one process.

    python benchmarks/ptq_speed.py [--threads 1,2] [--repeats 3]

Calibration = one ``lowbit.quantize`` call on 1,024 training images (BN folding, every pass,
finalization). Evaluation ratio = fake-quant time / FP time on the same 2,000 test images,
alternating FP and fake-quant runs and keeping each one's fastest (the machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import lowbit
from pause import paused
from ptq_ablation import commit, load_benchmark
from train_speed import cpu_description

RESULTS = Path(__file__).resolve().parent / "results" / "ptq_speed.json"
RECIPES = {"W8A8 min-max": lowbit.PTQConfig(),
           "W4A4 Banner all combined": lowbit.load_recipe("ptq-w4a4-banner"),
           "W4A4 lowbit best": lowbit.load_recipe("ptq-w4a4-best"),
           "W4A4 lowbit best + AdaRound": lowbit.load_recipe("ptq-w4a4-adaround"),
           "W4A4 deployable (ptq-w4a4-deploy, AdaRound)": lowbit.load_recipe("ptq-w4a4-deploy")}


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
    command = "python benchmarks/ptq_speed.py " + " ".join(sys.argv[1:])
    out = {"meta": {"commit": commit(), "command": command.strip(), "cpu": cpu_description(),
                    "repeats": args.repeats, "test_images": 2000, "calib_images": 1024}}
    with paused() as stopped:
        out["meta"]["training_paused"] = len(stopped)
        measure(model, calib, test, args, out)
    RESULTS.write_text(json.dumps(out, indent=1))


def measure(model, calib, test, args, out: dict) -> None:
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


if __name__ == "__main__":
    main()
