"""``lowbit demo``: the main job on the embedded default, no download, no arguments.

Trains a small CNN on the UCI handwritten digits shipped with scikit-learn, then quantizes it at
W8A8 / W4A8 / W4A4 / W2A8 with three PTQ recipes and reports accuracy and size against FP32.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from lowbit.data import Batches
from lowbit.data.digits import load_digits
from lowbit.evaluate import evaluate
from lowbit.io import write_json, write_text
from lowbit.methods.ptq import PTQConfig, quantize
from lowbit.models.small import digits_cnn
from lowbit.progress import progress
from lowbit.report import float_size_bytes, format_table, markdown_table, quantized_size_bytes
from lowbit.training import TrainConfig, train

BITS = [(8, 8), (4, 8), (4, 4), (2, 8)]
RECIPES = {
    "min-max": {},
    "banner": dict(clip="aciq-laplace", w_bit_alloc=True, bias_correction="mean"),
    "lowbit-best": dict(clip="mse", w_clip="mse", equalize=True, bias_correction="mean_std",
                        empirical_bias_correction=True),
}


def run_demo(out: Path, epochs: int = 30, seed: int = 0) -> list[list]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    norm = data.normalization()
    test = Batches(data.test, norm, 512)
    print(f"[1/3] training a small CNN on {len(data.train)} UCI digits ({epochs} epochs)")
    # 8x8 digits: no crop / flip augmentation (a flipped digit is another digit)
    config = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=3e-3,
                         augment=False, seed=seed, eval_every=epochs)
    model = train(digits_cnn(), data, norm, config).model
    fp_top1 = evaluate(model, test)
    fp_bytes = float_size_bytes(model)
    headers = ["recipe", "w_bits", "a_bits", "top-1 %", "drop", "size KiB", "x smaller"]
    rows = [["fp32", 32, 32, fp_top1, 0.0, fp_bytes / 1024, 1.0]]
    print(f"[2/3] quantizing at {', '.join(f'W{w}A{a}' for w, a in BITS)} "
          f"with {', '.join(RECIPES)}")
    calib = Batches(data.train, norm, 256)
    jobs = [(w, a, name) for w, a in BITS for name in RECIPES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for w, a, name in progress(jobs, desc="quantize"):
            cfg = PTQConfig(w_bits=w, a_bits=a, calib=len(data.train), seed=seed, **RECIPES[name])
            qmodel = quantize(model, cfg, calib)
            top1 = evaluate(qmodel, test)
            q_bytes = quantized_size_bytes(qmodel)
            rows.append([name, w, a, top1, top1 - fp_top1, q_bytes / 1024, fp_bytes / q_bytes])
    table = format_table(headers, rows)
    seconds = time.perf_counter() - start
    print(f"[3/3] {len(data.test)} held-out digits, first conv and last linear at 8 bits:\n")
    print(table)
    write_json(out / "report.json", {"dataset": "sklearn digits", "train": len(data.train),
                                     "test": len(data.test), "epochs": epochs, "seed": seed,
                                     "seconds": seconds, "headers": headers, "rows": rows})
    write_text(out / "report.md", "# lowbit demo\n\n" + markdown_table(headers, rows) + "\n")
    print(f"\nwrote {out}/report.json and report.md in {seconds:.0f} s")
    return rows
