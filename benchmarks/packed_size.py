"""Packed-file sizes against the ideal size (sum of code bits and qparams) and float32, for the
CIFAR-10 ResNets quantized by PTQ and prepared by the weight-sharing, ternary and binary methods
(k-means clustering, TWN / TTQ / BWN / BinaryConnect codes of the float weights: the size does
not depend on fine-tuning), and a bit-identity check of the reloaded model.

    python benchmarks/packed_size.py

Target (issue 5): file size within 2% + 16 KiB of the ideal size.
"""
from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import export_packed, load_packed
from lowbit.methods import training_method
from lowbit.report import float_size_bytes, quantized_size_bytes

from ptq_ablation import commit, load_benchmark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "packed_size.json"
SETTINGS = {"W8A8": dict(w_bits=8, a_bits=8), "W4A4": dict(w_bits=4, a_bits=4),
            "W4A4 bit-alloc": dict(w_bits=4, a_bits=4, w_bit_alloc=True),
            "W2A4": dict(w_bits=2, a_bits=4)}
# label -> (training method, its settings); first / last layer at 8 bits as everywhere
TRAINED = {"k-means 4-bit": ("kmeans", {"w_bits": 4}), "k-means 2-bit": ("kmeans", {"w_bits": 2}),
           "ternary (TWN)": ("twn", {}), "ternary (TTQ)": ("ttq", {}),
           "binary (BWN, alpha per filter)": ("bwn", {}), "binary (BinaryConnect)": ("bc", {}),
           "LSQ W4A4": ("lsq", {"w_bits": 4, "a_bits": 4})}


def main():
    warnings.simplefilter("ignore", UserWarning)
    results = {"meta": {"commit": commit(), "command": "python benchmarks/packed_size.py"}}
    tmp = Path(tempfile.mkdtemp())
    for name in ("resnet20", "resnet32"):
        model, calib, test = load_benchmark(name)
        x = next(iter(test))[0][:64]
        rows = results.setdefault(name, {"FP32": {"bytes": float_size_bytes(model)}})
        for label, cfg in SETTINGS.items():
            q = lowbit.quantize(model, lowbit.PTQConfig(**cfg), calib)
            path = export_packed(q, tmp / f"{name}-{label}.lowbit", name)
            back, _ = load_packed(path)
            rows[label] = {"ideal_bytes": quantized_size_bytes(q), "file_bytes": path.stat().st_size,
                           "bit_identical": bool(torch.equal(back(x), q(x)))}
            print(name, label, rows[label], flush=True)
        for label, (method, values) in TRAINED.items():
            trainer = training_method(method, values)
            q = trainer.prepare(copy.deepcopy(model).eval(), x[:8]).train()
            q(x)  # data-initialised state (LSQ steps, TTQ scales, EMA ranges)
            q.eval()
            trained = {"method": method, "method_config": trainer.config.to_dict(),
                       "input_shape": [3, 32, 32]}
            path = export_packed(q, tmp / f"{name}-{method}.lowbit", name, trained=trained)
            back, _ = load_packed(path)
            rows[label] = {"ideal_bytes": quantized_size_bytes(q), "file_bytes": path.stat().st_size,
                           "bit_identical": bool(torch.equal(back(x), q(x)))}
            print(name, label, rows[label], flush=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
