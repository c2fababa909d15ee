"""Every deploy path on torchvision's own architectures: the fully quantized simulation, the
integer engine and onnxruntime, all reading one lowering, compared on real CIFAR-10 images.

    python benchmarks/deploy_any_cnn.py [--archs mobilenet_v2,...] [--bits 8,4] [--images 1000]
                                        [--train-epochs 4] [--runs DIR] [--threads 1]
                                        [--size 224]

For each architecture and weight width (W8A8, W4A8; first / last layer 8-bit): top-1 agreement
and the largest logit difference in 8-bit output steps between each pair, export time, and the
ONNX file size against the packed file, at CIFAR's 32 px (every one of these architectures
takes it: their global pooling makes them size-agnostic). Target (issue 14): >= 99.9% top-1
agreement between simulation, engine and onnxruntime.

No ImageNet weights can be downloaded here, and random weights say little (a random network's
logits hardly vary between natural images, so any rounding flips its top-1): every model is
first trained here from scratch on the 10,000 CIFAR-10 training images of ``../shared``,
``--train-epochs`` epochs (SGD, cosine, augmented), with lowbit's own
``train`` (checkpointed under ``--runs``, so an interrupted run resumes and a finished one is
reused). The weights are then real, if weaker than ImageNet ones.

The last three pairs separate engine error from float32 noise: the same simulation run in
float64 on the model's own weight codes (:meth:`Lowering.simulation`, the exact simulation)
against the engine, onnxruntime and the float32 simulation. The float32 simulation's rounding
decisions differ from exact arithmetic wherever float32 error moves a value across a half step,
and each changed code moves the next layer's sums, so the differences multiply layer by layer;
how often that flips a top-1 depends on the model's margins.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.deploy import IntegerEngine, OnnxRunner, export_packed, lower, to_onnx
from lowbit.evaluate import agreement, evaluate
from lowbit.io import load_torch, load_weights
from lowbit.training import estimate_bn_statistics

from ptq_ablation import DATA, commit, record  # noqa: E402
from train_speed import cpu_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deploy_any_cnn.json"
DEFAULT_EPOCHS = 4
ARCHITECTURES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "resnet18", "resnet50", "shufflenet_v2_x1_0", "regnet_x_400mf",
                 "squeezenet1_1")


def torchvision_models():
    # torchvision's compiled ops cannot load on this CPU build of torch; its model definitions
    # are pure Python and import once the module registering those ops is replaced by an empty
    # one (benchmarks only: users have a working torchvision).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torchvision.models

    return torchvision.models


def trained(arch: str, data, args) -> nn.Module:
    """``arch`` trained on ``data`` (or reloaded from its finished run under ``args.runs``),
    its batch-norm statistics then estimated on 2,048 training images (see
    :func:`lowbit.training.estimate_bn_statistics`)."""
    model = _trained(arch, data, args)
    return estimate_bn_statistics(model, resized(Batches(data.train.subset(2048, seed=2),
                                                         data.normalization(), 128), args.size))


def resized(batches, size: int) -> list:
    """The batches with their images resized (bilinear) to ``size`` pixels: the CIFAR-trained
    models run at ImageNet's 224 px on the same images (batch-norm statistics estimated at that
    size), to measure the deploy paths at that scale."""
    if size == 32:
        return batches
    return [(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False), y)
            for x, y in batches]


def _trained(arch: str, data, args) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision_models().get_model(arch, num_classes=10)
    out = Path(args.runs) / f"{arch}-{args.train_epochs}ep"
    if (out / "model.pt").is_file():
        load_weights(model, load_torch(out / "model.pt"), out / "model.pt")
        return model.eval()
    config = lowbit.TrainConfig(epochs=args.train_epochs, batch_size=128, lr=0.03,
                                weight_decay=5e-4, schedule="cosine", seed=0,
                                eval_every=args.train_epochs)
    result = lowbit.train(model, data, data.normalization(), config, out=out,
                          resume=(out / "checkpoint.pt").is_file())
    torch.save(result.model.state_dict(), out / "model.pt")
    return result.model.eval()


def run(arch: str, w_bits: int, data, args) -> dict:
    norm = data.normalization()
    calib = resized(Batches(data.train.subset(512, seed=0), norm, 128), args.size)
    test = resized(Batches(data.test.subset(args.images, seed=1), norm, 100 if args.size == 32
                           else 10), args.size)
    model = trained(arch, data, args)
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=w_bits, a_bits=8), calib)
    start = time.perf_counter()
    lowering = lower(q, calib)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    onnx_model = to_onnx(lowering, (1, 3, args.size, args.size))
    export_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        packed = export_packed(q, Path(tmp) / "m.lowbit", f"torchvision:{arch}", 10)
        packed_bytes = packed.stat().st_size
    sim, engine = lowering.simulation(), IntegerEngine(lowering)
    runtime = OnnxRunner(onnx_model, args.threads)
    exact = lowering.simulation(torch.float64)
    pairs = {"engine vs simulation": (sim, engine), "onnxruntime vs simulation": (sim, runtime),
             "onnxruntime vs engine": (engine, runtime),
             "engine vs float64 simulation": (exact, engine),
             "onnxruntime vs float64 simulation": (exact, runtime),
             "float32 vs float64 simulation": (exact, sim)}
    row = {"fp_top1": evaluate(model, test), "sim_form_top1": evaluate(q, test),
           "lower_seconds": lower_seconds, "export_seconds": export_seconds,
           "onnx_bytes": len(onnx_model.SerializeToString()), "packed_bytes": packed_bytes,
           "float_bytes": 4 * sum(p.numel() for p in model.parameters()),
           "grids": len(lowering.grids), "nodes": len(lowering.graph_module.graph.nodes)}
    for label, (reference, candidate) in pairs.items():
        start = time.perf_counter()
        row[label] = agreement(reference, candidate, test)
        row[label]["seconds"] = time.perf_counter() - start
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32, help="input pixels (CIFAR images resized)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-epochs", type=int, default=DEFAULT_EPOCHS,
                    help="rows trained longer are recorded apart, as '<arch>, N epochs'")
    ap.add_argument("--runs", default=str(Path.home() / "lowbit-runs" / "deploy-any-cnn"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    data = load_dataset(DATA["cifar10"])
    command = "python benchmarks/deploy_any_cnn.py " + " ".join(sys.argv[1:])
    meta = json.loads(RESULTS.read_text()).get("meta", {}) if RESULTS.is_file() else {}
    longer = "" if args.train_epochs == DEFAULT_EPOCHS else f", {args.train_epochs} epochs"
    # Longer-trained runs are made one architecture list at a time: each keeps its own command.
    run_name = f"{args.size} px" + (f", {args.archs}{longer}" if longer else "")
    commands = {**meta.get("commands", {}), run_name: command.strip()}
    record(RESULTS, "meta", None, {"commit": commit(), "cpu": cpu_description(),
                                   "threads": args.threads, "commands": commands})
    for arch in args.archs.split(","):
        for w_bits in map(int, args.bits.split(",")):
            start = time.perf_counter()
            row = run(arch, w_bits, data, args)
            row.update(seconds=time.perf_counter() - start, images=args.images,
                       train_epochs=args.train_epochs, commit=commit())
            key = (arch if args.size == 32 else f"{arch} at {args.size} px") + longer
            record(RESULTS, key, f"W{w_bits}A8", row)
            print(arch, w_bits, {k: (v["top1_agreement"], round(v["max_logit_diff_steps"], 2))
                                 if isinstance(v, dict) else v for k, v in row.items()},
                  flush=True)


if __name__ == "__main__":
    main()
