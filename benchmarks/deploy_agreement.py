"""Agreement of lowbit's integer-only engine and of its QDQ ONNX export (run in onnxruntime and
in OpenVINO) and of its XNNPACK program (ExecuTorch; compared with the fully quantized
lowering's own simulation, which it runs) with the fake-quant simulation, on the full CIFAR-10
test set (ResNet-20; ResNet-32 beside it): top-1 of each, top-1 agreement, and the logit differences in 8-bit output steps.

    python benchmarks/deploy_agreement.py [--models resnet20,resnet32] [--runtimes ...]

Targets (issues 5 and 16): top-1 agreement >= 99.9% for W8A8 and W4A4 ResNet-20, logits within
one output quantization step; each runtime's top-1 within 0.1 points of the simulation. OpenVINO
rows also record the precision each conv / linear layer ran in (its execution graph). Each
runtime is also compared with the simulation run in float64 on the model's own weight codes
(``vs_float64``, :meth:`lowbit.deploy.Lowering.simulation`): the engine's integer sums are
exact, and the float32 simulation's own distance to float64 (the "float32 simulation" row) is
the noise floor of a float32 reference. Rows are merged into the JSON, so a
run of some runtimes keeps the others.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import lowbit
from lowbit.deploy import lower
from lowbit.deploy.integer import IntegerEngine
from lowbit.deploy.onnx_export import OnnxRunner, to_onnx
from lowbit.errors import LowbitError
from lowbit.evaluate import agreement

from ptq_ablation import commit, load_benchmark  # noqa: E402
from train_speed import cpu_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deploy_agreement.json"
SETTINGS = {"W8A8": lowbit.PTQConfig(w_bits=8, a_bits=8),
            "W4A4 deploy recipe": lowbit.load_recipe("ptq-w4a4-deploy"),
            "W7A8 int8 deploy recipe": lowbit.load_recipe("ptq-int8-deploy"),
            # mixed precision (issue 18): widths per layer at a 3-bit mean, through every path
            "W4A4 deploy recipe mixed to avg 3 bits": lowbit.load_recipe("ptq-w4a4-deploy",
                                                                          avg_bits=3.0)}
RUNTIMES = ("integer engine", "onnxruntime", "openvino", "xnnpack")
FULLY_QUANTIZED = ("xnnpack",)  # runtimes that need every tensor an integer
CALIB_IMAGES = 256  # for the fully quantized form's free grids, as lowbit export --data uses


def runner(runtime: str, q, threads: int):
    if runtime == "integer engine":
        return IntegerEngine(q)
    if runtime == "onnxruntime":
        return OnnxRunner(to_onnx(q, (1, 3, 32, 32)), threads)
    if runtime == "xnnpack":
        from lowbit.deploy.executorch_runtime import ExecuTorchRunner
        return ExecuTorchRunner(q, threads=threads)
    from lowbit.deploy.openvino_runtime import OpenVinoRunner
    return OpenVinoRunner(to_onnx(q, (1, 3, 32, 32)), threads)


class Replay:
    """Returns recorded outputs batch by batch, so :func:`agreement` can compare runs made
    once (each runtime, and the references, run over the test set a single time)."""

    def __init__(self, outputs: list):
        self.outputs = iter(outputs)

    def __call__(self, x):
        return next(self.outputs)


@torch.no_grad()
def outputs(run, test) -> list:
    return [torch.as_tensor(run(x)).float() for x, _ in test]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,resnet32")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["meta"] = {"commit": commit(), "threads": args.threads, "cpu": cpu_description(),
                       "command": "python benchmarks/deploy_agreement.py"}
    for name in args.models.split(","):
        model, calib, test = load_benchmark(name)
        for label in args.settings.split(","):
            q = lowbit.quantize(model, SETTINGS[label], calib)
            sim32 = outputs(q, test)
            sim64 = outputs(lower(q).simulation(torch.float64), test)
            runs = {"float32 simulation": (None, sim32)}
            references = {}  # runtime -> its own (float32, float64) simulation outputs
            for runtime in args.runtimes.split(","):
                source = q
                if runtime in FULLY_QUANTIZED:
                    images = torch.cat([x for x, _ in calib])[:CALIB_IMAGES]
                    source = lower(q, [images])
                    references[runtime] = (outputs(source.simulation(), test),
                                           outputs(source.simulation(torch.float64), test))
                try:
                    run = runner(runtime, source, args.threads)
                    t = time.perf_counter()
                    runs[runtime] = (run, outputs(run, test), time.perf_counter() - t)
                except LowbitError as e:  # a runtime that cannot run this setting
                    results.setdefault(name, {}).setdefault(label, {})[runtime] = {
                        "refused": str(e), "commit": commit()}
                    print(name, label, runtime, "refused:", e, flush=True)
            for runtime, (run, outs, *seconds) in runs.items():
                ref32, ref64 = references.get(runtime, (sim32, sim64))
                row = agreement(Replay(ref32), Replay(outs), test)
                row["vs_float64"] = agreement(Replay(ref64), Replay(outs), test)
                row["reference"] = "fully quantized simulation" if runtime in references \
                    else "simulation"
                row["seconds"] = seconds[0] if seconds else None
                row["commit"] = commit()
                if hasattr(run, "precisions"):
                    row["precisions"] = run.precisions()
                results.setdefault(name, {}).setdefault(label, {})[runtime] = row
                print(name, label, runtime, row["top1_agreement"],
                      row["vs_float64"]["top1_agreement"], flush=True)
                RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
