"""Peak memory and time of streaming calibration at ImageNet scale (issue 15).

    python benchmarks/calib_memory.py [--archs resnet18,resnet50] [--images 256,1024,2048]
                                      [--recipes minmax,best,adaround] [--adaround-iters 20]
                                      [--calib-memory 2GiB] [--threads 1]

torchvision's ResNet-18 / ResNet-50 at 224 px, random weights with the batch-norm statistics
settled on random images (so activations keep a natural scale), calibrated on N seeded random
images produced batch by batch (the data never exists as one tensor). Each run is its own
process, so its peak resident memory (``ru_maxrss``: the high-water mark, file-backed pages
included) is the run's alone. Target: peak RSS independent of N within 10%, under 4 GB for
ResNet-50 with the default 2 GiB budget.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from ptq_ablation import commit, record  # noqa: E402
from train_speed import cpu_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "calib_memory.json"
BATCH = 64


class RandomImages:
    """``n`` seeded random 224 px images in batches of :data:`BATCH`, made on demand."""

    def __init__(self, n: int, seed: int = 0, size: int = 224):
        self.n, self.seed, self.size = n, seed, size

    def __iter__(self):
        for start in range(0, self.n, BATCH):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
            yield torch.randn(min(BATCH, self.n - start), 3, self.size, self.size, generator=g)


def settled(arch: str) -> torch.nn.Module:
    sys.modules.setdefault("torchvision._meta_registrations",  # see tests/conftest.py: the
                           type(sys)("torchvision._meta_registrations"))  # compiled ops can't load
    import torchvision.models

    from lowbit.training import estimate_bn_statistics

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=1000)
    return estimate_bn_statistics(model, list(RandomImages(64, seed=99)))


def config(recipe: str, n: int, args):
    import lowbit
    from lowbit.recipes import load_recipe

    common = dict(calib=n, calib_batch_size=BATCH, calib_memory=args.calib_memory)
    if recipe == "minmax":
        return lowbit.PTQConfig(w_bits=4, a_bits=4, **common)
    if recipe == "best":
        return load_recipe("ptq-w4a4-best", **common)
    return load_recipe("ptq-w4a4-adaround", round_iters=args.adaround_iters, **common)


def one(arch: str, recipe: str, n: int, args) -> dict:
    import lowbit

    torch.set_num_threads(args.threads)
    model = settled(arch)
    start = time.perf_counter()
    q = lowbit.quantize(model, config(recipe, n, args), RandomImages(n))
    seconds = time.perf_counter() - start
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "seconds": seconds, "notes": q.lowbit.notes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet18,resnet50")
    ap.add_argument("--images", default="256,1024,2048")
    ap.add_argument("--recipes", default="minmax,best,adaround")
    ap.add_argument("--adaround-iters", type=int, default=20)
    ap.add_argument("--calib-memory", default="2GiB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=3, metavar=("ARCH", "RECIPE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        arch, recipe, n = args.one
        print(json.dumps(one(arch, recipe, int(n), args)))
        return
    meta = json.loads(RESULTS.read_text()).get("meta", {}) if RESULTS.is_file() else {}
    command = "python benchmarks/calib_memory.py " + " ".join(sys.argv[1:])
    commands = [c for c in meta.get("commands", []) if c != command] + [command]
    record(RESULTS, "meta", None, {"commit": commit(), "cpu": cpu_description(),
                                   "threads": args.threads, "calib_memory": args.calib_memory,
                                   "adaround_iters": args.adaround_iters, "commands": commands})
    for arch in args.archs.split(","):
        for recipe in args.recipes.split(","):
            for n in map(int, args.images.split(",")):
                out = subprocess.run([sys.executable, __file__, "--one", arch, recipe, str(n),
                                      "--adaround-iters", str(args.adaround_iters),
                                      "--calib-memory", args.calib_memory,
                                      "--threads", str(args.threads)],
                                     capture_output=True, text=True, cwd=Path(__file__).parent)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                record(RESULTS, arch, f"{recipe} {n}", {**row, "images": n, "commit": commit()})
                print(arch, recipe, n, {k: v for k, v in row.items() if k != "notes"}, flush=True)


if __name__ == "__main__":
    main()
