"""What fine-tuning's crop padding does to a converged network's BatchNorm statistics, with no
weight changed: re-estimate every BN layer's running mean / variance in train mode (PyTorch's
EMA, momentum 0.1) over 100 training batches of 128, without augmentation, with zero-padded crops
and with reflection-padded crops (pad 4, then flip), and evaluate on the full test set.

    python benchmarks/bn_padding.py [--models resnet20,psg_resnet32] [--steps 100]

Zero padding is applied to pixels in [0, 1] before normalization (black borders), as
torchvision's RandomCrop does for the akamaster ResNets; the PSG reference pads by reflection.
A fine-tuning run re-estimates these statistics whatever it does to the weights, so a drop here
is a floor under every method fine-tuned with that padding.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.data.core import normalization_tensors
from lowbit.models import MODELS
from lowbit.training.augment import pad_crop_flip

from ptq_ablation import load_benchmark, training_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bn_padding.json"
AUGMENTATIONS = {"none": None, "zero-padded crop + flip": False,
                 "reflection-padded crop + flip": True}


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor, norm, reflect: bool | None,
                  steps: int, batch: int = 128) -> nn.Module:
    """A copy of ``model`` whose BN running statistics were updated over ``steps`` seeded
    batches of ``images`` (uint8 [N, C, H, W]); ``reflect`` None: no augmentation."""
    model = copy.deepcopy(model).train()
    mean, std = normalization_tensors(norm, images.shape[1])
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    for step in range(steps):
        idx = order[(step * batch) % len(images):][:batch]
        x = images[idx].float() / 255.0
        if reflect is not None:
            x = pad_crop_flip(x, generator, reflect=reflect)
        model((x - mean) / std)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,psg_resnet32")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    results = {}
    for name in args.models.split(","):
        model, _, test = load_benchmark(name)
        data, norm = training_data(name)
        row = {"checkpoint padding": "reflection" if MODELS[name].reflect_pad else "zero",
               "FP32": lowbit.evaluate(model, test)}
        for label, reflect in AUGMENTATIONS.items():
            row[label] = lowbit.evaluate(
                reestimate_bn(model, data.train.images, norm, reflect, args.steps), test)
            print(name, label, row[label], flush=True)
        results[name] = row
    results["meta"] = {"machine": platform.processor() or platform.machine(),
                       "threads": args.threads, "steps": args.steps, "batch": 128,
                       "command": f"python benchmarks/bn_padding.py --steps {args.steps}"}
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
