"""Seconds per training step of the engine (``lowbit.train``: augmentation, forward, backward,
update, method hooks) in eager mode, with ``channels_last``, with ``compile`` and with both, as
ratios to eager measured in the same run, the modes interleaved round by round.

    python benchmarks/train_speed.py [--threads 1] [--steps 12] [--rounds 2]

The PSG ResNet-32 at batch 128 on random 32x32 images (timing only: the data do not change the
step's cost). Each run trains one epoch of ``--steps`` steps; the first 3 steps (where
compilation happens) are left out, the rest give the median. Compilation time is reported
separately: the first step's time minus the median.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from lowbit.data.core import Dataset, Split
from lowbit.io import write_json
from lowbit.methods import training_method
from lowbit.models import MODELS, build_model
from lowbit.training import TrainConfig, train

from pause import paused  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_speed.json"
MODES = {"eager": {}, "channels_last": {"channels_last": True}, "compile": {"compile": True},
         "compile + channels_last": {"compile": True, "channels_last": True}}
METHODS = {"fp": None, "lsq": {"w_bits": 4, "a_bits": 4}}
WARMUP = 3


ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "amx_tile")


def cpu_description() -> str:
    """The CPU's model name and the vector instruction sets it reports (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    return f"{fields.get('model name', platform.machine())}, " + \
        " ".join(f for f in ISA_FLAGS if f in flags)


def step_times(method: str, mode: dict, data: Dataset, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model("psg_resnet32")
    marks = [time.perf_counter()]
    config = TrainConfig(epochs=1, batch_size=128, lr=0.01, seed=0, reflect_pad=True, **mode)
    trainer = training_method(method, METHODS[method]) if METHODS[method] else None
    train(model, data, MODELS["psg_resnet32"].normalization, config, method=trainer,
          callbacks=[lambda *_: marks.append(time.perf_counter())])
    return [b - a for a, b in zip(marks, marks[1:])][:steps]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128 * args.steps, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (128 * args.steps,), generator=g)
    test = Split(images[:8], labels[:8])
    data = Dataset("random", Split(images, labels), test, 100)
    times = {m: {mode: [] for mode in MODES} for m in METHODS}
    first = {m: {mode: [] for mode in MODES} for m in METHODS}
    with paused() as stopped:  # no timing beside a long training run
        for _ in range(args.rounds):
            for method in METHODS:
                for mode, settings in MODES.items():
                    t = step_times(method, settings, data, args.steps)
                    times[method][mode] += t[WARMUP:]
                    first[method][mode].append(t[0])
                    print(f"{method:4s} {mode:24s} median {statistics.median(t[WARMUP:]):.3f} "
                          f"s, first step {t[0]:.1f} s", flush=True)
    result = {"model": "psg_resnet32", "batch": 128, "threads": args.threads,
              "machine": cpu_description(),
              "command": f"python benchmarks/train_speed.py --threads {args.threads} --steps "
                         f"{args.steps} --rounds {args.rounds}",
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip(),
              "training_paused": len(stopped), "methods": {}}
    for method in METHODS:
        base = statistics.median(times[method]["eager"])
        result["methods"][method] = {mode: {
            "seconds_per_step": statistics.median(ts), "speedup": base / statistics.median(ts),
            "compile_seconds": max(first[method][mode]) - statistics.median(ts)}
            for mode, ts in times[method].items()}
    write_json(RESULTS, result)
    for method, rows in result["methods"].items():
        for mode, r in rows.items():
            print(f"{method:4s} {mode:24s} {r['seconds_per_step']:.3f} s/step  "
                  f"{r['speedup']:.2f}x eager  (first step +{r['compile_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
