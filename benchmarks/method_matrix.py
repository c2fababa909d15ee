"""Every lowbit method on every torchvision architecture, through every deploy path it has.

    python benchmarks/method_matrix.py [--archs mobilenet_v2,...] [--methods ptq-w8a8,lsq,...]
                                       [--images 256] [--round-iters 20]

For each (architecture, method): the PTQ recipes quantize on ``--images`` CIFAR-10 training
images; the training methods fine-tune one epoch on them (batch 32, Adam 1e-4: this checks
that the method runs, not what accuracy it reaches; the accuracy benchmarks are elsewhere).
Then each result is exported as a packed file and reloaded (bit-identical outputs required),
exported to ONNX and run by onnxruntime where its codes are affine, run by the integer engine
(fully quantized) where they are, and through the XNOR-popcount kernel for XNOR-Net. A cell
records "ok" or the one-line reason the path refuses the model, and the layers a method kept
at higher precision. AdaRound recipes run ``--round-iters`` steps per layer (1000 in the
recipe) to keep the matrix in minutes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.data.core import Dataset
from lowbit.deploy import IntegerEngine, OnnxRunner, deploy_xnor, export_packed, load_packed, \
    lower, to_onnx
from lowbit.errors import LowbitError
from lowbit.methods import TRAINING_METHODS, training_method
from lowbit.methods.psg import PSGMethod, ptq_config
from lowbit.recipes import recipe_names

from deploy_any_cnn import ARCHITECTURES, torchvision_models  # noqa: E402
from ptq_ablation import DATA, commit, record  # noqa: E402
from train_speed import cpu_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "method_matrix.json"
PTQ_RECIPES = [name for name in recipe_names() if name.startswith("ptq-")]


def build(arch: str, method: str, data: Dataset, args):
    """(the quantized model, the ``trained`` header for its packed file or None, warnings)."""
    torch.manual_seed(0)
    model = torchvision_models().get_model(arch, num_classes=10).eval()
    norm = data.normalization()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method.startswith("ptq-"):
            config = lowbit.load_recipe(method)
            if config.w_round == "adaround":
                config = lowbit.load_recipe(method, round_iters=args.round_iters)
            q = lowbit.quantize(model, config, Batches(data.train, norm, 64))
            trained = None
        else:
            trainer = training_method(method)
            train_config = lowbit.TrainConfig(epochs=1, batch_size=32, optimizer="adam",
                                              lr=1e-4, augment=False, seed=0)
            result = lowbit.train(model, data, norm, train_config, method=trainer)
            q = trainer.finalize(result.model).eval()
            trained = {"method": method, "method_config": trainer.config.to_dict(),
                       "input_shape": [3, 32, 32]}
            if isinstance(trainer, PSGMethod):  # PSG's deployable: PTQ on the trained grid
                q = lowbit.quantize(q, ptq_config(trainer.config), Batches(data.train, norm, 64))
                trained = None
    notes = sorted({str(w.message) for w in caught if "kept at" in str(w.message)})
    return q, trained, notes


def cell(fn) -> str:
    try:
        return fn() or "ok"
    except LowbitError as e:
        return f"refused: {e}"


def run(arch: str, method: str, data: Dataset, args) -> dict:
    start = time.perf_counter()
    try:
        q, trained, notes = build(arch, method, data, args)
    except LowbitError as e:
        return {"method": f"refused: {e}", "seconds": time.perf_counter() - start}
    x = torch.cat([xb for xb, _ in Batches(data.test, data.normalization(), 64)])[:16]
    calib = [xb for xb, _ in Batches(data.train.head(128), data.normalization(), 64)]
    row = {"method": "ok", "notes": notes, "build_seconds": time.perf_counter() - start}

    def packed():
        with tempfile.TemporaryDirectory() as tmp:
            path = export_packed(q, Path(tmp) / "m.lowbit", f"torchvision:{arch}", 10,
                                 trained=trained)
            row["packed_bytes"] = path.stat().st_size
            back, _ = load_packed(path)
            if not torch.equal(back(x), q(x)):
                return "reloaded model differs"

    def onnx():
        out = OnnxRunner(to_onnx(q, (1, 3, 32, 32), calib=calib))(x)
        row["onnx_top1_agreement"] = float((out.argmax(1) == lower(q, calib).simulation()(x)
                                            .argmax(1)).float().mean())

    def engine():
        lowering = lower(q, calib)
        out = IntegerEngine(lowering)(x)
        row["engine_top1_agreement"] = float((out.argmax(1) == lowering.simulation()(x)
                                              .argmax(1)).float().mean())

    def xnor():
        if method != "xnor":
            return "-"
        row["xnor_equal_top1"] = bool(torch.equal(deploy_xnor(q)(x).argmax(1), q(x).argmax(1)))

    with torch.no_grad():
        for name, fn in (("packed", packed), ("onnx", onnx), ("engine", engine),
                         ("xnor_kernel", xnor)):
            row[name] = cell(fn)
    row["seconds"] = time.perf_counter() - start
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    ap.add_argument("--methods", default=",".join([*PTQ_RECIPES, *TRAINING_METHODS]))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--round-iters", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    full = load_dataset(DATA["cifar10"])
    data = Dataset(full.name, full.train.subset(args.images, seed=0), full.test.head(64), 10)
    command = "python benchmarks/method_matrix.py " + " ".join(sys.argv[1:])
    if args.archs == ap.get_default("archs") and args.methods == ap.get_default("methods"):
        # a rerun of some cells keeps the full run's meta (each cell records its commit)
        record(RESULTS, "meta", None, {"commit": commit(), "cpu": cpu_description(),
                                       "command": command.strip(), "images": args.images,
                                       "round_iters": args.round_iters})
    for arch in args.archs.split(","):
        for method in args.methods.split(","):
            row = run(arch, method, data, args)
            row["commit"] = commit()
            record(RESULTS, arch, method, row)
            print(arch, method, {k: v for k, v in row.items() if k != "notes"}, flush=True)


if __name__ == "__main__":
    main()
