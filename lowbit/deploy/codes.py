"""Integer codes and the few float parameters of every non-affine weight quantizer.

Each encoder reads the quantized weight ``W_q = slot(W)`` (what the network computes with) and
returns non-negative integer codes, one row per output channel, at the method's real width,
plus the parameters that turn codes back into ``W_q``; :func:`decode` does that with the same
float operation the quantizer used, so the decoded tensor equals ``W_q`` bit for bit:

=============  =====  ===========================================  ==========================
kind           bits   codes                                        W_q
=============  =====  ===========================================  ==========================
binary         1      1 where W_q > 0                              2c - 1 (BinaryConnect, BNN)
scaled_binary  1      1 where W_q > 0                              alpha_row * (2c - 1) (BWN)
ternary        2      0 / 1 / 2 for -1 / 0 / +1                    alpha * t (TWN)
ttq            2      0 / 1 / 2 for -W^n / 0 / +W^p                W^p, 0, -W^n (TTQ)
kmeans         log2k  cluster index (pruned weights: the code k)   codebook[row, c] (0: pruned)
lsq            b      v + Q_N, v = round(clamp(W/s, -Q_N, Q_P))    v * s (LSQ)
=============  =====  ===========================================  ==========================

Affine weights (PTQ, STE QAT) keep their quantizer and are handled by :mod:`lowbit.deploy.packed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import ConfigError
from lowbit.nn.binary import BinaryWeight, ScaledBinaryWeight, TernaryWeight, TTQWeight
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.shared_weights import KMeansQuantizer


@dataclass
class WeightCodes:
    kind: str
    codes: torch.Tensor          # [rows, n] int64 >= 0
    bits: int
    params: dict[str, torch.Tensor]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@torch.no_grad()
def encode(slot, weight: torch.Tensor, name: str) -> WeightCodes:
    """The codes of ``slot(weight)``, or ConfigError naming the layer for an unknown slot."""
    training = slot.training
    slot.eval()
    try:
        w_q = _rows(slot(weight.detach()))
    finally:
        slot.train(training)
    if isinstance(slot, BinaryWeight):
        return WeightCodes("binary", (w_q > 0).long(), 1, {})
    if isinstance(slot, ScaledBinaryWeight):
        return WeightCodes("scaled_binary", (w_q > 0).long(), 1,
                           {"alpha": w_q.abs().amax(1, keepdim=True)})
    if isinstance(slot, TernaryWeight):
        alpha = w_q.abs().max()
        return WeightCodes("ternary", (torch.sign(w_q) + 1).long(), 2, {"alpha": alpha})
    if isinstance(slot, TTQWeight):  # codes from the latent weights: W^p, W^n may share a value
        w = _rows(weight.detach())
        delta = slot.threshold * w.abs().max()
        codes = torch.ones_like(w, dtype=torch.long)
        codes[w > delta], codes[w < -delta] = 2, 0
        return WeightCodes("ttq", codes, 2,
                           {"w_p": slot.w_p.detach().clone(), "w_n": slot.w_n.detach().clone()})
    if isinstance(slot, KMeansQuantizer):
        rows = slot.indices.reshape(weight.shape[0], -1)
        k = slot.codebook.shape[-1]
        pruned = bool((rows < 0).any())
        bits = max(1, math.ceil(math.log2(k + int(pruned))))
        return WeightCodes("kmeans", torch.where(rows < 0, k, rows), bits,
                           {"codebook": slot.codebook.detach().clone()})
    if isinstance(slot, LSQQuantizer):
        q_n, q_p = slot.bounds
        step = slot.step.detach().reshape(-1, 1) if slot.step.dim() else slot.step.detach()
        codes = torch.round(w_q / step).long() + q_n
        return WeightCodes("lsq", codes, slot.bits, {"step": step.clone(),
                                                     "q_n": torch.tensor(q_n)})
    raise ConfigError(f"{name}: the packed format has no encoding for {type(slot).__name__} "
                      "weights")


def decode(kind: str, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W_q`` as ``[rows, n]`` float32 from codes and parameters (see the module table)."""
    c = codes.long()
    largest = {"ternary": 2, "ttq": 2,
               "kmeans": params["codebook"].shape[-1] if "codebook" in params else 0}.get(kind)
    if largest is not None and c.numel() and int(c.max()) > largest:
        raise ConfigError(f"{kind} codes reach {int(c.max())}, past the largest code {largest}")
    if kind == "binary":
        return (2 * c - 1).float()
    if kind == "scaled_binary":
        return params["alpha"] * (2 * c - 1).float()
    if kind == "ternary":
        return params["alpha"] * (c - 1).float()
    if kind == "ttq":
        return params["w_p"] * (c == 2) - params["w_n"] * (c == 0)
    if kind == "kmeans":
        book = params["codebook"]
        table = torch.cat([book, book.new_zeros(len(book), 1)], 1)
        rows = table.expand(len(c), -1) if len(table) == 1 else table
        return torch.gather(rows, 1, c)
    if kind == "lsq":
        return (c - params["q_n"]).float() * params["step"]
    raise ConfigError(f"unknown weight encoding {kind!r} (a newer lowbit wrote this file?)")
