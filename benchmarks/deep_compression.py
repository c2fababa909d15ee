"""Deep Compression's pipeline (Han et al. 2016) as its Table 1 reports it: pruning + k-means
weight sharing + Huffman coding on the CIFAR-10 ResNet-20 and ResNet-32, the size of the real
packed file at each stage against the float32 model, and top-1 on the full test set.

    python benchmarks/deep_compression.py [--models resnet20,resnet32] [--epochs 4]
        [--prune 0.6] [--bits 4] [--threads 1]

Stages: the float model; magnitude pruning and k-means at ``--bits`` (first / last layer at 8
bits, lowbit's policy), before and after centroid fine-tuning (Adam lr 1e-4, cosine, on the
10,000-image CIFAR-10 batch in ../shared); then the same model exported with ``--entropy
huffman`` (codes Huffman-coded, pruned weights by relative index where smaller), reloaded from
the file and evaluated. Unlike the paper, pruning and clustering share one fine-tuning run
(the paper retrains after each). Runs train in ``benchmarks/runs/deep-compression-*``
(resumable); results go to ``benchmarks/results/deep_compression.json`` row by row.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import export_packed, load_packed
from lowbit.methods import training_method
from lowbit.models import MODELS
from lowbit.report import float_size_bytes
from lowbit.training import TrainConfig, train

from ptq_ablation import commit, load_benchmark, record, training_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "deep_compression.json"
RUNS = ROOT / "benchmarks" / "runs"


def file_row(model, name: str, num_classes: int, trained: dict, test, entropy=None) -> dict:
    """Top-1 of the model reloaded from its packed file, and the file's bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = export_packed(model, Path(folder) / "m.lowbit", name, num_classes,
                             trained=trained, entropy=entropy)
        back, header = load_packed(path)
        codings = sorted({w.get("entropy", {}).get("coding", "bit-packed")
                          for w in header["weights"].values()})
        return {"top1": lowbit.evaluate(back, test), "bytes": path.stat().st_size,
                "codings": codings}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,resnet32")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--prune", type=float, default=0.6)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    values = {"w_bits": args.bits, "prune": args.prune}
    for name in args.models.split(","):
        model, _, test = load_benchmark(name)
        data, norm = training_data(name)
        example = next(iter(test))[0][:8]
        fp_bytes = float_size_bytes(model)
        rows = {"FP32": {"top1": lowbit.evaluate(model, test), "bytes": fp_bytes}}
        method = training_method("kmeans", values)
        trained = {"method": "kmeans", "method_config": method.config.to_dict(),
                   "input_shape": list(example.shape[1:])}
        shared = method.prepare(copy.deepcopy(model).eval(), example)
        rows["pruned + k-means, no fine-tuning"] = file_row(shared, name, 10, trained, test)
        config = TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-4,
                             weight_decay=0.0, schedule="cosine", seed=0,
                             reflect_pad=MODELS[name].reflect_pad, eval_every=args.epochs)
        out = RUNS / f"deep-compression-{name}-p{args.prune}-w{args.bits}"
        result = train(model, data, norm, config, method=training_method("kmeans", values),
                       out=out, resume=(out / "checkpoint.pt").is_file())
        tuned = result.model.eval()
        rows["pruned + k-means, fine-tuned"] = {
            **file_row(tuned, name, 10, trained, test), "epochs": result.metrics}
        rows["+ Huffman coding"] = file_row(tuned, name, 10, trained, test, entropy="huffman")
        for row in rows.values():
            row["ratio"] = fp_bytes / row["bytes"]
        record(RESULTS, name, None, {**rows, "settings": {**values, "epochs": args.epochs},
                                     "commit": commit()})
        for label, row in rows.items():
            print(name, label, f"{row['top1']:.2f}", row["bytes"], f"{row['ratio']:.1f}x",
                  flush=True)
    record(RESULTS, "meta", None, {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "command": f"python benchmarks/deep_compression.py --models {args.models} --epochs "
                   f"{args.epochs} --prune {args.prune} --bits {args.bits}"})


if __name__ == "__main__":
    main()
