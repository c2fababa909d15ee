"""CIFAR training augmentation on tensors (He et al. 2016): pad 4, random 32x32 crop, random
horizontal flip. Written on whole batches with one generator, so a run is reproducible from
its seed (no torchvision: it does not work with the CPU torch this project pins)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                  reflect: bool = False) -> torch.Tensor:
    """Each image of ``x`` [N, C, H, W] padded by ``pad`` (zeros, or reflection as in the PSG
    code), cropped back to H x W at a uniform random offset, and flipped left-right with
    probability 1/2."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect" if reflect else "constant")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)                                   # [N, H]
    cols = dx[:, None] + torch.arange(w)                                   # [N, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    images = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[images, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
