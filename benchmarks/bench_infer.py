"""Inference speed: lowbit's int8 ResNet-20 (recipe ptq-int8-deploy, run by onnxruntime) against
FP32 eager PyTorch and the int8 peers (PyTorch FX x86, onnxruntime quantize_static QDQ), at batch
1 and 128, one and two threads, with every runner's top-1 on the full CIFAR-10 test set.

    python benchmarks/bench_infer.py

Target (issue 5): lowbit's int8 at least matches the fastest peer at both batch sizes, with the
accuracy of lowbit's simulation. Timing is interleaved (lowbit.deploy.bench); long training runs
are paused while it runs (``pause.py``); run it with no other benchmark on the machine.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from lowbit.cli import main as lowbit

from pause import paused  # noqa: E402
from ptq_ablation import SHARED, commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_infer.json"


def main():
    warnings.simplefilter("ignore", UserWarning)
    with paused() as stopped:
        code = lowbit(["bench-infer", "--model", "resnet20", "--checkpoint",
                       str(SHARED / "checkpoints" / "akamaster_resnet20-12fca82f.th"),
                       "--data",
                       "cifar10=" + str(SHARED / "data" / "cifar-10-python-batch1-test.tar.xz"),
                       "--threads", "1,2", "--batch-sizes", "1,128", "--batch-size", "500",
                       "--out", str(RESULTS)])
    if code:
        raise SystemExit(code)
    result = json.loads(RESULTS.read_text())
    result["meta"] = {"commit": commit(), "command": "python benchmarks/bench_infer.py",
                      "paused_training_runs": len(stopped)}
    RESULTS.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
