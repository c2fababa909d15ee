"""MobileNetV2 (width 0.5, CIFAR stem) on CIFAR-100: lowbit's PTQ recipes against every peer.

    python benchmarks/mobilenet_ptq.py --train          # train or resume the FP model (hours)
    python benchmarks/mobilenet_ptq.py [--limit N]      # the PTQ table (resumable)

The float model is trained here by ``lowbit train`` (:data:`TRAIN_ARGS`: ``--epochs`` of cosine,
40 by default; the full 50,000 training images) into ``--run`` (default
``benchmarks/long_runs/mbv2-050-c100``); ``--train`` starts or resumes it. The run takes several
sessions, so its resume checkpoint is committed with the other long runs (issue 19) after each
one; the finished ``model.pt`` stays out of git (``.gitignore``) and the table recreates it
with ``--train``. The table then
uses that run's ``model.pt``, or with ``--partial`` its latest epoch checkpoint (to try the
script while training goes on; those rows are marked with the epoch and are not the table's
figures).

Every row: the same 1,024 seeded training images for calibration, the full 10,000-image test
set, first conv and classifier at 8 bits where the tool can say so.
* lowbit: every packaged PTQ recipe (``lowbit.RECIPES``).
* PyTorch FX (histogram observers), onnxruntime ``quantize_static`` (percentile; entropy with
  2,048 bins), Brevitas's PTQ pipeline (CLE + bias correction + MSE ranges), as in
  ``ptq_peers.py``.
* NNCF (``lowbit.deploy.bench.nncf_int8``: ``nncf.quantize`` on the float ONNX model read by
  OpenVINO, run in OpenVINO): int8 only
  (its PTQ has no 4-bit activation mode), default preset (symmetric int8 activations and
  weights, per-channel weights, fast bias correction).
Results go to benchmarks/results/mobilenet_ptq.json with the commit and seconds of each row.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.cli import main as lowbit_main
from lowbit.data import Batches, load_dataset
from lowbit.deploy.bench import nncf_int8
from lowbit.models import build_model
from ptq_ablation import DATA, commit, record
from ptq_peers import brevitas_ptq, onnxruntime_ptq, torch_fx_ptq
from train_speed import cpu_description

RESULTS = Path(__file__).resolve().parent / "results" / "mobilenet_ptq.json"
MODEL = "mobilenet_v2_cifar_050"
FIRST_LAST = ("features.0.0", "classifier.1")
TRAIN_ARGS = ["--model", MODEL, "--data", DATA["cifar100"], "--method", "fp",
              "--lr", "0.1", "--schedule", "cosine", "--weight-decay", "5e-4",
              "--train-batch-size", "128", "--channels-last", "--seed", "0"]
RECIPES = ["ptq-w8a8", "ptq-int8-deploy", "ptq-w4a8", "ptq-w4a4-deploy", "ptq-w4a4-best",
           "ptq-w4a4-banner", "ptq-w4a4-adaround", "ptq-w3a3-adaround", "ptq-w2a4-adaround"]
PEERS = [("pytorch-fx", "histogram"), ("onnxruntime", "percentile"),
         ("onnxruntime", "entropy-2048"), ("brevitas", "cle+bc+mse")]
PEER_BITS = [(8, 8), (4, 8), (4, 4)]


def load_model(run: Path, partial: bool) -> tuple[torch.nn.Module, str]:
    """The trained float model and where it came from ("model.pt" or "epoch N")."""
    model = build_model(MODEL)
    if (run / "model.pt").is_file():
        state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
        source = "model.pt"
    elif partial and (run / "checkpoint.pt").is_file():
        payload = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        state, source = payload["state_dict"], f"epoch {payload['epoch'] + 1} checkpoint"
    else:
        raise SystemExit(f"no trained model in {run}: run this script with --train first")
    model.load_state_dict(state)
    return model.eval(), source


def peer(tool: str, variant: str, model, calib, w_bits: int, a_bits: int):
    if tool == "pytorch-fx":
        return torch_fx_ptq(model, calib, w_bits, a_bits, FIRST_LAST, variant)
    if tool == "onnxruntime":
        return onnxruntime_ptq(model, calib, w_bits, a_bits, FIRST_LAST, variant)
    if tool == "brevitas":
        return brevitas_ptq(model, calib, w_bits, a_bits, variant, FIRST_LAST[1],
                            act_type="asym")
    return nncf_int8(model, calib, torch.get_num_threads())


def rows():
    """(label, run) for every row; ``run(model, calib)`` returns the model to evaluate."""
    for name in RECIPES:
        config = lowbit.load_recipe(name)
        yield (f"W{config.w_bits}A{config.a_bits} lowbit {name}",
               lambda model, calib, config=config: lowbit.quantize(model, config, calib))
    for w_bits, a_bits in PEER_BITS:
        for tool, variant in PEERS:
            yield (f"W{w_bits}A{a_bits} {tool} {variant}",
                   lambda model, calib, t=tool, v=variant, w=w_bits, a=a_bits:
                   peer(t, v, model, calib, w, a))
    yield "W8A8 nncf openvino", lambda model, calib: peer("nncf", "", model, calib, 8, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path,
                    default=Path(__file__).resolve().parent / "long_runs" / "mbv2-050-c100")
    ap.add_argument("--train", action="store_true", help="train (or resume) the float model")
    ap.add_argument("--partial", action="store_true",
                    help="use the latest epoch checkpoint while training is unfinished")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=40,
                    help="--train: length of the cosine schedule (40)")
    ap.add_argument("--compile", action="store_true", help="--train: torch.compile the step")
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    ap.add_argument("--only", help="comma-separated substrings: run only matching rows")
    args = ap.parse_args()
    if args.train:
        resume = ["--resume"] if (args.run / "checkpoint.pt").is_file() else []
        extra = ["--compile"] if args.compile else []
        raise SystemExit(lowbit_main(["train", *TRAIN_ARGS, "--epochs", str(args.epochs),
                                      "--threads", str(args.threads), "--out", str(args.run),
                                      *extra, *resume]))
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, source = load_model(args.run, args.partial)
    data = load_dataset(DATA["cifar100"])
    norm = data.normalization()
    calib = list(Batches(data.train.subset(1024, seed=0), norm, 64))
    test = Batches(data.test, norm, 500)
    report = args.run / "report.json"  # the schedule the float model really had
    trained = json.loads(report.read_text())["train"] if report.is_file() else {}
    train_flags = f"--epochs {trained.get('epochs', '?')}" + \
        (" --compile" if trained.get("compile") else "")
    record(RESULTS, "meta", None, {"commit": commit(), "cpu": cpu_description(),
                                   "threads": args.threads, "limit": args.limit,
                                   "train_command": "python benchmarks/mobilenet_ptq.py --train "
                                                    + train_flags,
                                   "command": "python benchmarks/mobilenet_ptq.py --threads "
                                              f"{args.threads}"})
    done = json.loads(RESULTS.read_text()).get(MODEL, {})
    if done.get("FP32", {}).get("source") != source:  # a new float model: every row again
        done = {}
        record(RESULTS, MODEL, None, {})
    table = [("FP32", lambda model, calib: model), *rows()]
    for label, run in table:
        if label in done or (args.only and not any(s in label for s in args.only.split(","))):
            continue
        start = time.perf_counter()
        quantized = run(model, calib)
        seconds = time.perf_counter() - start
        top1 = lowbit.evaluate(quantized, test, args.limit)
        record(RESULTS, MODEL, label, {"top1": top1, "calib_seconds": seconds,
                                       "commit": commit(), "source": source})
        print(f"{label:44s} {top1:6.2f}  calib {seconds:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
