"""Cross-layer equalization (Nagel, van Baalen, Blankevoort, Welling 2019, "Data-Free
Quantization", section 4.1).

For two layers y = f(W2 f(W1 x + b1)) with a positively homogeneous f (ReLU, or identity),
scaling output channel i of layer 1 by 1/s_i and input channel i of layer 2 by s_i leaves the
function unchanged. The choice that makes both per-channel ranges equal is

    s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i)

with r1_i = max|W1[i, ...]| and r2_i = max|W2[:, i, ...]|. Channels where either range is 0 are
left alone (s_i = 1).
"""
from __future__ import annotations

import torch


def equalization_scales(w1: torch.Tensor, w2: torch.Tensor, groups2: int = 1) -> torch.Tensor:
    """The DFQ scale s (length = out channels of layer 1) for consecutive weights w1 -> w2.

    ``w1`` is [C, ...]; ``w2`` is a conv weight [O, C/groups2, ...] or a linear weight [O, C].
    For a depthwise layer 2 (groups2 == C) input channel i is its own output channel i.
    """
    r1 = w1.detach().abs().reshape(w1.shape[0], -1).amax(1)
    w2 = w2.detach().abs()
    if groups2 == 1:
        r2 = w2.transpose(0, 1).reshape(w2.shape[1], -1).amax(1)
    else:
        per_group_in = w2.shape[1]
        out_per_group = w2.shape[0] // groups2
        # Group g reads inputs [g*per_group_in, (g+1)*per_group_in) and writes its own outputs.
        r2 = w2.reshape(groups2, out_per_group, per_group_in, -1).amax(dim=(1, 3)).reshape(-1)
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))),
                       torch.ones_like(r1))
