"""The modern binary recipe, ingredient by ingredient: binary weights and activations trained
from the float checkpoints (first / last layer 8-bit), ResNet-20 on the CIFAR-10 training batch
in ../shared and the PSG ResNet-32 on CIFAR-100; top-1 on the full 10k test set.

    python benchmarks/binary_recipe.py [--models resnet20] [--epochs 20] [--labels "..."]

Each row adds one ingredient to the row above it (``ROWS``): XNOR-Net as ``compress_train.py``
trains it, then Bi-Real's real-valued shortcut around every binary conv, ReActNet's RSign and
RPReLU, Bi-Real's ApproxSign gradient, distillation from the float model, and the two-stage
schedule (binary activations with real weights for the first half, cosine restarting at the
second), then the same without XNOR-Net's K (``input_scale: false``). Every row: Adam, lr 1e-3, no weight decay, batch 128, crop and flip (padded as the
checkpoint was trained), the same epochs. Runs train in ``benchmarks/runs/binary-...``
(resumable: run the same command again) and each finished row is written to
``benchmarks/results/binary_recipe.json`` with its per-epoch curve as soon as it ends.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch

from lowbit.methods import training_method
from lowbit.models import MODELS
from lowbit.report import quantized_size_bytes
from lowbit.training import TrainConfig, train

from ptq_ablation import load_benchmark, record, training_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "binary_recipe.json"
RUNS = ROOT / "benchmarks" / "runs"

BIREAL = {"shortcuts": "bireal"}
REACT = {**BIREAL, "learnable_threshold": True, "rprelu": True}
APPROX = {**REACT, "sign_gradient": "approx"}
# (label, method settings, training settings beyond the shared budget)
ROWS = [
    ("xnor", {}, {}),
    ("+ bi-real shortcuts", BIREAL, {}),
    ("+ rsign, rprelu", REACT, {}),
    ("+ approxsign", APPROX, {}),
    ("+ distillation", APPROX, {"distill": True, "kd_alpha": 0.9}),
    ("+ two stages", {**APPROX, "two_stage": True}, {"distill": True, "kd_alpha": 0.9}),
    # XNOR-Net's K dropped, as Bi-Real Net and ReActNet have none (the faster deployed form)
    ("+ no K", {**APPROX, "two_stage": True, "input_scale": False},
     {"distill": True, "kd_alpha": 0.9}),
]


def config_for(name: str, epochs: int, values: dict, extra: dict):
    """(method settings, TrainConfig) of one row; ``two_stage`` becomes the weights' start
    epoch (half the run) and a cosine restart there."""
    values = dict(values)
    if values.pop("two_stage", False):
        values["binary_weights_from_epoch"] = epochs // 2
        extra = {**extra, "milestones": [epochs // 2]}
    config = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3,
                         weight_decay=0.0, schedule="cosine",
                         reflect_pad=MODELS[name].reflect_pad, seed=0, **extra)
    return {"kind": "xnor", **values}, config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--labels", help="only these rows, in this order (separated by ';')")
    ap.add_argument("--runs", default=str(RUNS), help="folder of the runs' checkpoints "
                    "(benchmarks/long_runs, tracked by git, for runs longer than a session)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    labels = args.labels.split(";") if args.labels else [row[0] for row in ROWS]
    rows = {row[0]: row for row in ROWS}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    for name in args.models.split(","):
        model, _, _ = load_benchmark(name)
        data, norm = training_data(name)
        for label in labels:
            _, values, extra = rows[label]
            settings, config = config_for(name, args.epochs, values,
                                          {**extra, "compile": args.compile})
            slug = "".join(c for c in label if c.isalnum() or c in "-.") or "xnor"
            out = Path(args.runs) / f"binary-{name}-{args.epochs}ep-{slug}"
            t = time.perf_counter()
            result = train(model, data, norm, config, method=training_method("xnor", settings),
                           out=out, resume=(out / "checkpoint.pt").is_file())
            record(RESULTS, name, f"{label}, {args.epochs} ep", {
                "top1": result.metrics[-1]["test_top1"],
                "bytes": quantized_size_bytes(result.model), "method": settings,
                "train": config.to_dict(), "epochs": result.metrics, "commit": commit,
                "seconds_this_call": time.perf_counter() - t})
            print(name, label, result.metrics[-1]["test_top1"], flush=True)
    record(RESULTS, "meta", None, {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "command": f"python benchmarks/binary_recipe.py --models {args.models} "
                   f"--epochs {args.epochs}{' --compile' if args.compile else ''}"})


if __name__ == "__main__":
    main()
