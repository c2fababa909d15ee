"""Banner et al. 2019 ablation (Table 1 layout) on the real CIFAR checkpoints in ../shared.

    python benchmarks/ptq_ablation.py [--models resnet20,resnet32,psg_resnet32] [--limit N]

Calibration: 1,024 training images (seeded); evaluation: the full 10k test set. Activations are
quantized at the input of every Conv / Linear (residual-add outputs stay float, as in Brevitas's
layerwise mode). First conv and last linear at 8 bits unless the row says otherwise. Results are
appended to benchmarks/results/ptq_ablation.json after every row, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.models import MODELS, build_model
from lowbit.report import float_size_bytes, quantized_size_bytes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results" / "ptq_ablation.json"

MODELS_TO_RUN = {
    "resnet20": ("cifar10", "akamaster_resnet20-12fca82f.th"),
    "resnet32": ("cifar10", "akamaster_resnet32-d509ac18.th"),
    "psg_resnet32": ("cifar100", "PSG_ResNet150.pth"),
}
DATA = {"cifar10": "cifar10=" + str(SHARED / "data" / "cifar-10-python-batch1-test.tar.xz"),
        "cifar100": "cifar100=" + str(SHARED / "data" / "cifar-100-python.tar.xz")}

BANNER_ALL = dict(a_per_channel=True, clip="aciq-laplace", w_bit_alloc=True, a_bit_alloc=True,
                  bias_correction="mean")
# lowbit's additions: Banner's steps + cross-layer equalization + MSE weight ranges with mean+std
# weight correction + empirical bias correction (per-channel activations), and the deployable
# recipe: per-tensor activations and integer weights (no float weight correction), with learned
# rounding.
BEST = dict(BANNER_ALL, equalize=True, w_clip="mse", bias_correction="mean_std",
            empirical_bias_correction=True)
DEPLOY = dict(equalize=True, w_clip="mse", clip="mse", empirical_bias_correction=True,
              w_round="adaround", round_iters=1000)
# Learned rounding instead of Banner's weight correction (slower: minutes, not seconds).
ADAROUND = dict(BEST, bias_correction=None, w_round="adaround", round_iters=1000)
ADAROUND_LABEL = "W4A4 lowbit best + AdaRound (1,000 steps per layer) instead of weight BC"
BEST_LABEL = "W4A4 lowbit best: all combined + CLE + MSE weights + mean-std & empirical BC"
DEPLOY_LABEL = ("W4A4 lowbit deployable (per-tensor act, integer weights; ptq-w4a4-deploy): "
                "CLE + MSE + empirical BC + AdaRound")
ROWS = [
    ("W8A8 baseline", dict(w_bits=8, a_bits=8)),
    ("W4A8 baseline", dict(w_bits=4, a_bits=8)),
    ("W4A8 +bias-corr", dict(w_bits=4, a_bits=8, bias_correction="mean")),
    ("W4A8 +bit-alloc", dict(w_bits=4, a_bits=8, w_bit_alloc=True)),
    ("W4A8 both", dict(w_bits=4, a_bits=8, w_bit_alloc=True, bias_correction="mean")),
    ("W8A4 baseline (per-ch act)", dict(w_bits=8, a_bits=4, a_per_channel=True)),
    ("W8A4 +ACIQ", dict(w_bits=8, a_bits=4, a_per_channel=True, clip="aciq-laplace")),
    ("W8A4 +bit-alloc", dict(w_bits=8, a_bits=4, a_per_channel=True, a_bit_alloc=True)),
    ("W8A4 both", dict(w_bits=8, a_bits=4, a_per_channel=True, clip="aciq-laplace", a_bit_alloc=True)),
    ("W4A4 baseline (per-ch act)", dict(w_bits=4, a_bits=4, a_per_channel=True)),
    ("W4A4 baseline (per-tensor act)", dict(w_bits=4, a_bits=4)),
    ("W4A4 all combined", dict(w_bits=4, a_bits=4, **BANNER_ALL)),
    ("W4A4 all combined, every layer 4-bit", dict(w_bits=4, a_bits=4, first_last_bits=None, **BANNER_ALL)),
    ("W3A3 all combined", dict(w_bits=3, a_bits=3, **BANNER_ALL)),
    ("W2A4 all combined", dict(w_bits=2, a_bits=4, **BANNER_ALL)),
    (BEST_LABEL, dict(w_bits=4, a_bits=4, **BEST)),
    ("W4A8 lowbit best", dict(w_bits=4, a_bits=8, **BEST)),
    ("W3A3 lowbit best", dict(w_bits=3, a_bits=3, **BEST)),
    # At 2 bits MSE weight ranges minimise weight error but not output error, and mean+std
    # correction divides by the std of channels that quantize mostly to 0 (W2A4 ResNet-20 on
    # 1,000 test images: 15.1 with both, 74.9 with min-max weights and mean-only correction).
    ("W2A4 lowbit: all combined + CLE + empirical BC (min-max weights, mean-only weight BC)",
     dict(w_bits=2, a_bits=4, **{**BEST, "w_clip": "minmax", "bias_correction": "mean"})),
    (DEPLOY_LABEL, dict(w_bits=4, a_bits=4, **DEPLOY)),
    (ADAROUND_LABEL, dict(w_bits=4, a_bits=4, **ADAROUND)),
    ("W3A3 lowbit best + AdaRound", dict(w_bits=3, a_bits=3, **ADAROUND)),
    # MSE weight ranges collapse at 2 bits with AdaRound too (ResNet-20, 2,000 test images:
    # 18.95 with MSE ranges, 85.15 with min-max ones).
    ("W2A4 lowbit + AdaRound (min-max weights)",
     dict(w_bits=2, a_bits=4, **{**ADAROUND, "w_clip": "minmax"})),
]


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except Exception:
        return "unknown"


def load_benchmark(name: str):
    """(model, normalized calibration batches, normalized test batches) for a benchmark model:
    1,024 seeded training images for calibration, the full test set for evaluation."""
    dataset_name, ck = MODELS_TO_RUN[name]
    data = load_dataset(DATA[dataset_name])
    model = build_model(name, SHARED / "checkpoints" / ck)
    norm = MODELS[name].normalization
    return model, Batches(data.train.subset(1024, seed=0), norm, 256), Batches(data.test, norm, 500)


def record(path: Path, model: str, label: str | None, row: dict) -> None:
    """Write one result row (``label`` None: ``row`` is the model's whole entry, e.g. "meta")
    into the JSON file, re-read just before so that rows other runs of a script wrote since
    this one started are kept."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    if label is None:
        results[model] = row
    else:
        results.setdefault(model, {})[label] = row
    path.write_text(json.dumps(results, indent=1))


def training_data(name: str):
    """(the whole dataset, the model's input normalization) for fine-tuning a benchmark model."""
    return load_dataset(DATA[MODELS_TO_RUN[name][0]]), MODELS[name].normalization


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS_TO_RUN))
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rerun", action="store_true",
                    help="recompute every quantized row of --models (after a calibration change)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.rerun:
        for name in args.models.split(","):
            results[name] = {k: v for k, v in results.get(name, {}).items() if k == "FP32"}
    previous = results.get("meta", {}).get("commit")
    for name in MODELS_TO_RUN:  # rows remember the commit that computed them
        for row in results.get(name, {}).values():
            row.setdefault("commit", previous)
    current = dict(ROWS)
    for name in MODELS_TO_RUN:  # rows whose label or config is no longer in ROWS: drop them
        for label, row in list(results.get(name, {}).items()):
            if label != "FP32" and row.get("config") != current.get(label):
                del results[name][label]
    results["meta"] = {"commit": commit(), "machine": platform.processor() or platform.machine(),
                       "threads": args.threads, "calib_images": 1024, "limit": args.limit,
                       "command": "python benchmarks/ptq_ablation.py"
                       + (f" --models {args.models} --rerun" if args.rerun else "")}
    for name in args.models.split(","):
        model, calib, test = load_benchmark(name)
        done = results.setdefault(name, {})
        if "FP32" not in done:
            t = time.perf_counter()
            done["FP32"] = {"top1": lowbit.evaluate(model, test, args.limit),
                            "eval_seconds": time.perf_counter() - t,
                            "bytes": float_size_bytes(model), "commit": commit()}
            RESULTS.write_text(json.dumps(results, indent=1))
        for label, cfg in ROWS:
            if label in done:
                continue
            qmodel = lowbit.quantize(model, lowbit.PTQConfig(**cfg), calib)
            t = time.perf_counter()
            top1 = lowbit.evaluate(qmodel, test, args.limit)
            done[label] = {"top1": top1, "calib_seconds": qmodel.lowbit.calibration_seconds,
                           "eval_seconds": time.perf_counter() - t,
                           "bytes": quantized_size_bytes(qmodel), "config": cfg,
                           "commit": commit()}
            RESULTS.write_text(json.dumps(results, indent=1))
            print(f"{name:14s} {label:52s} {top1:6.2f}  calib {qmodel.lowbit.calibration_seconds:5.1f}s",
                  flush=True)


if __name__ == "__main__":
    main()
