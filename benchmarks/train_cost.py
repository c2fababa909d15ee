"""Cost of one training step (forward, backward, SGD update; batch 128) with each training
method, as a ratio to the float step of the same model, measured in one run with the methods
interleaved round by round so machine load affects them alike.

    python benchmarks/train_cost.py [--threads 1] [--rounds 7]

Targets (issue 3): LSQ and STE fake-quant <= 1.5x the float step, PSG <= 1.1x.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from lowbit.methods import training_method
from lowbit.models import build_model

from pause import paused  # noqa: E402  (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_cost.json"
METHODS = {"fp": None, "qat": {"w_bits": 4, "a_bits": 4}, "lsq": {"w_bits": 4, "a_bits": 4},
           "psg": {"w_bits": 4}}
MODELS = {"resnet20": 10, "psg_resnet32": 100}


def make_step(model_name: str, method: str, x: torch.Tensor, y: torch.Tensor):
    model = build_model(model_name, num_classes=MODELS[model_name])
    trainer = training_method(method, METHODS[method]) if METHODS[method] else None
    if trainer is not None:
        model = trainer.prepare(model.eval(), x[:8])
        with torch.no_grad():
            model(x[:8])  # quantizers calibrate on their first input
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for model_name, classes in MODELS.items():
        x = torch.randn(128, 3, 32, 32, generator=g)
        y = torch.randint(classes, (128,), generator=g)
        steps = {m: make_step(model_name, m, x, y) for m in METHODS}
        for step in steps.values():
            step()  # warm-up
        times = {m: [] for m in METHODS}
        with paused() as stopped:  # no long training run beside the timed steps
            for _ in range(args.rounds):
                for m, step in steps.items():
                    t = time.perf_counter()
                    step()
                    times[m].append(time.perf_counter() - t)
        median = {m: statistics.median(v) for m, v in times.items()}
        row = {"fp_step_seconds": median["fp"], "paused_training_runs": len(stopped),
               "ratio": {m: median[m] / median["fp"] for m in METHODS if m != "fp"},
               "seconds": times}
        results.setdefault(model_name, {})[f"threads={args.threads}"] = row
        print(model_name, args.threads, {m: round(r, 3) for m, r in row["ratio"].items()},
              f"fp {median['fp']:.2f}s", flush=True)
    results["meta"] = {"machine": platform.processor() or platform.machine(),
                       "command": "python benchmarks/train_cost.py --threads 1 and --threads 2",
                       "batch": 128, "rounds": args.rounds}
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
