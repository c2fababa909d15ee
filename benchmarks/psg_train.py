"""PSG reproduction on CIFAR-100 ResNet-32, compressed for a CPU: PSGD against plain SGD with
the same schedule and seed, both fine-tuned from the reference's epoch-82 checkpoint, then PTQ
on the PSG grid at W4A32, W3A32, W2A32 and W4A4 (BN clipping), per-layer grid SSE (the paper's
Table A3 quantity) and the weight-histogram figure.

    python benchmarks/psg_train.py [--epochs 3] [--train-limit N] [--threads 1]

The paper's run (68 epochs: lr 0.01, x0.1 after 40 of them, i.e. at epoch 123; lambda_s 150;
W4; batch 128; weight decay 1e-4; reflection padding; seed 1) is the same call with
``--epochs 68 --milestone 40``, or ``lowbit train`` as printed by ``--print-paper-command``.

Each run trains in ``--runs``/``psg-{sgd,psgd}-...`` (a checkpoint per epoch; rerunning the
script resumes) and its evaluation is written to ``benchmarks/results/psg_train.json`` row by
row. The default folder, ``benchmarks/long_runs``, is tracked by git: no session's machine
outlives it, so a session commits the runs' last checkpoints (about 4 MB each) before it stops
and the next one resumes them from the checkout. ``--eval-every N`` evaluates the grid every N epochs along the way (the paper's run: 10)
without changing the schedule; ``--variant`` runs SGD and PSGD in separate processes, side by
side; ``--channels-last`` / ``--compile`` speed the step up (``benchmarks/train_speed.py``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.methods.psg import PSGConfig, PSGMethod, ptq_config, unwrap
from lowbit.models import MODELS, build_model
from lowbit.report.weights import grid_errors, plot_weights
from lowbit.training import TrainConfig, train
from ptq_ablation import record  # noqa: E402  (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results" / "psg_train.json"
FIGURE = ROOT / "benchmarks" / "results" / "psg_weights"
RUNS = ROOT / "benchmarks" / "long_runs"  # tracked: see the docstring
START = SHARED / "checkpoints" / "PSG_ResNet82.pth"
DATA = "cifar100=" + str(SHARED / "data" / "cifar-100-python.tar.xz")
PAPER_COMMAND = (
    "lowbit train --model psg_resnet32 --checkpoint ../shared/checkpoints/PSG_ResNet82.pth "
    "--data cifar100=../shared/data/cifar-100-python.tar.xz --method psg --w-bits 4 "
    "--lambda-s 150 --epochs 68 --lr 0.01 --schedule multistep --milestones 40 "
    "--weight-decay 1e-4 --train-batch-size 128 --reflect-pad --seed 1 --out runs/psg-paper")


def evaluate_grid(model, psg: PSGConfig, calib, test) -> dict:
    """PTQ of a float model on the PSG grid at several widths, and W4A4 with BN clipping (the
    reference's eval: signed gamma, n = 6, the image left in float)."""
    out = {"fp": lowbit.evaluate(model, test)}
    for bits in (4, 3, 2):
        q = lowbit.quantize(model, ptq_config(PSGConfig(w_bits=bits)), calib)
        out[f"w{bits}a32"] = lowbit.evaluate(q, test)
    cfg = ptq_config(psg, a_bits=4, clip="bn", bn_signed_gamma=True,
                     overrides={"conv1": {"a_bits": None}})
    out["w4a4_bn_clip"] = lowbit.evaluate(lowbit.quantize(model, cfg, calib), test)
    out["grid_sse"] = {f"{b}bit": grid_errors(model, b) for b in (4, 3, 2)}
    out["grid_sse_total"] = {k: sum(v.values()) for k, v in out["grid_sse"].items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--milestone", type=int, help="epochs before the x0.1 decay (60%%)")
    ap.add_argument("--train-limit", type=int, help="training images per epoch (all 50,000)")
    ap.add_argument("--test-limit", type=int, help="test images (all 10,000); for smoke runs")
    ap.add_argument("--lambda-s", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--print-paper-command", action="store_true")
    ap.add_argument("--variant", choices=["sgd", "psgd", "both"], default="both")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="evaluate the grid every N epochs along the run (0: at the end only)")
    ap.add_argument("--runs", default=str(RUNS), help="folder of the runs' checkpoints")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.print_paper_command:
        print(PAPER_COMMAND)
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    data = load_dataset(DATA)
    if args.train_limit:
        data.train = data.train.subset(args.train_limit, seed=1)
    norm = MODELS["psg_resnet32"].normalization
    data.test = data.test.head(args.test_limit)
    calib = Batches(data.train.subset(1024, seed=0), norm, 256)
    test = Batches(data.test, norm, 500)
    milestone = args.milestone or max(1, round(0.6 * args.epochs))
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.01, momentum=0.9,
                         weight_decay=1e-4, schedule="multistep", milestones=[milestone],
                         reflect_pad=True, seed=1, channels_last=args.channels_last,
                         compile=args.compile)
    psg = PSGConfig(w_bits=4, lambda_s=args.lambda_s)
    key = f"epochs={args.epochs},milestone={milestone},train={len(data.train)}," \
          f"test={len(data.test)},lambda={args.lambda_s}"
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    done = results.get(key, {})
    if "start" not in done:
        done["start"] = evaluate_grid(build_model("psg_resnet32", START), psg, calib, test)
        record(RESULTS, key, "start", done["start"])
    # the command is recorded first: a table of a run still training names it
    command = (f"python benchmarks/psg_train.py --epochs {args.epochs} --milestone {milestone} "
               f"--lambda-s {args.lambda_s:g}"
               + (f" --train-limit {args.train_limit}" if args.train_limit else "")
               + (f" --eval-every {args.eval_every}" if args.eval_every else "")
               + (" --channels-last" if args.channels_last else "")
               + (" --compile" if args.compile else ""))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    commands = {**results.get("meta", {}).get("commands", {}), key: command}
    record(RESULTS, "meta", None, {"machine": platform.processor() or platform.machine(),
                                   "threads": args.threads, "command": command,
                                   "commands": commands, "paper_command": PAPER_COMMAND})
    models = {}
    variants = ("sgd", "psgd") if args.variant == "both" else (args.variant,)
    stops = sorted({*range(args.eval_every, args.epochs, args.eval_every), args.epochs}) \
        if args.eval_every else [args.epochs]
    for variant in variants:
        # plain SGD does not depend on lambda_s: one run serves every lambda_s
        run = key if variant == "psgd" else key.rsplit(",lambda=", 1)[0]
        out = Path(args.runs) / f"psg-{variant}-{run.replace(',', '-').replace('=', '')}"
        along = dict(done.get(f"{variant} along the run", {}))
        for stop in stops:
            method = PSGMethod(psg) if variant == "psgd" else None
            t = time.perf_counter()
            result = train(build_model("psg_resnet32", START), data, norm, config,
                           method=method, out=out, resume=(out / "checkpoint.pt").is_file(),
                           until_epoch=stop)
            model = unwrap(result.model)
            reached = result.metrics[-1]["epoch"] if result.metrics else 0
            if stop < args.epochs and str(stop) not in along and reached == stop:
                along[str(stop)] = {"epoch": stop, "seconds_this_call": time.perf_counter() - t,
                                    **evaluate_grid(model, psg, calib, test)}
                record(RESULTS, key, f"{variant} along the run", along)
        models[variant] = model
        if variant not in done:
            done[variant] = {"train_seconds_this_call": time.perf_counter() - t,
                             "epochs": result.metrics, **evaluate_grid(model, psg, calib, test)}
            record(RESULTS, key, variant, done[variant])
        print(variant, {k: v for k, v in done[variant].items() if k in
                        ("fp", "w4a32", "w3a32", "w2a32", "w4a4_bn_clip")}, flush=True)
    if len(models) == 2:
        plot_weights({"SGD": models["sgd"], "PSGD": models["psgd"]}, 4, FIGURE)


if __name__ == "__main__":
    main()
