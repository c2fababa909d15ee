"""How fast PSGD pulls the weights onto the 4-bit grid, per step, as a function of lambda_s:
the CIFAR-100 ResNet-32 epoch-82 checkpoint, ``--steps`` SGD steps (lr 0.01, momentum 0.9,
weight decay 1e-4, batch 128, reflection-padded crop and flip, the same batches for every
lambda_s), then the summed per-layer grid SSE (the paper's Table A3 quantity).

    python benchmarks/psg_rate.py [--steps 60] [--lambdas 0,150,500]

Scaled-gradient noise shrinks a weight's distance to its grid point by a factor that grows as
(lr lambda_s)^2 per step; this measurement is what the compressed PSG schedule of
``psg_train.py`` leans on to stand in for the paper's 41 epochs at lr 0.01.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.data import load_dataset
from lowbit.data.core import normalization_tensors
from lowbit.methods.psg import PSGConfig, PSGMethod, unwrap
from lowbit.models import MODELS, build_model
from lowbit.report.weights import grid_errors
from lowbit.training.augment import pad_crop_flip

from psg_train import DATA, START  # noqa: E402
from ptq_ablation import commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "psg_rate.json"


def grid_sse_after(data, mean, std, steps: int, lambda_s: float) -> float:
    torch.manual_seed(1)
    model = build_model("psg_resnet32", START)
    if lambda_s > 0:
        model = PSGMethod(PSGConfig(w_bits=4, lambda_s=lambda_s)).prepare(
            model, torch.zeros(2, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data.train), (128,), generator=batches)
        x = pad_crop_flip(data.train.images[idx].float() / 255, batches, reflect=True)
        loss = F.cross_entropy(model((x - mean) / std), data.train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sum(grid_errors(unwrap(model) if lambda_s > 0 else model, 4).values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lambdas", default="0,150,500")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    data = load_dataset(DATA)
    mean, std = normalization_tensors(MODELS["psg_resnet32"].normalization, 3)
    start = sum(grid_errors(build_model("psg_resnet32", START), 4).values())
    out = {"meta": {"commit": commit(), "steps": args.steps, "command":
                    f"python benchmarks/psg_rate.py --steps {args.steps} --lambdas {args.lambdas}"},
           "start_sse4": start, "sse4_after": {}}
    for lam in (float(v) for v in args.lambdas.split(",")):
        t = time.perf_counter()
        out["sse4_after"][str(lam)] = grid_sse_after(data, mean, std, args.steps, lam)
        print(lam, start, out["sse4_after"][str(lam)], f"{time.perf_counter() - t:.0f}s",
              flush=True)
    RESULTS.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
