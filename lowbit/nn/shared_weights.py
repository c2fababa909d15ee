"""K-means weight sharing in the weight slot (Deep Compression; see :mod:`lowbit.quant.kmeans`).

The layer's weight is ``codebook[row, index]``: ``indices`` (a buffer, frozen) and the codebook
are set once by :meth:`KMeansQuantizer.cluster`; pruned weights have index -1 and stay 0.
Two ways to fine-tune:

* ``update="centroid"`` (the paper): the codebook is a parameter; autograd of the gather gives
  each centroid the sum of the gradients of the weights that share it, and the optimizer
  updates it. The latent float weight gets no gradient.
* ``update="recentre"`` (the MIT lab's variant): the float weights train with a
  straight-through gradient and after each optimizer step every centroid is reset to the mean
  of the float weights in its cluster (:meth:`recentre`), indices fixed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn.quantizer import LazyBuffers
from lowbit.quant.binary import IdentitySTE
from lowbit.quant.kmeans import INITS, cluster_weights

UPDATES = ("centroid", "recentre")


class KMeansQuantizer(LazyBuffers, nn.Module):
    lazy_buffers = ("indices",)

    def __init__(self, bits: int, per_channel: bool = False, init: str = "linear",
                 update: str = "centroid", name: str = ""):
        super().__init__()
        if update not in UPDATES:
            raise ConfigError(f"k-means update must be one of {UPDATES}, got {update!r}")
        if init not in INITS:
            raise ConfigError(f"k-means init must be one of {INITS}, got {init!r}")
        self.bits, self.per_channel, self.init, self.update, self.name = \
            bits, per_channel, init, update, name
        self.codebook = nn.Parameter(torch.zeros(0), requires_grad=update == "centroid")
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int64))

    @torch.no_grad()
    def cluster(self, weight: torch.Tensor, prune_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> None:
        codebook, indices, _ = cluster_weights(weight, self.bits, self.init, self.per_channel,
                                               prune_mask, generator, self.name)
        self.codebook = nn.Parameter(codebook, requires_grad=self.update == "centroid")
        self.indices = indices

    def shared(self) -> torch.Tensor:
        """codebook[row, index], 0 where pruned, shaped like the weight."""
        rows = self.indices.reshape(self.indices.shape[0] if self.per_channel else 1, -1)
        table = torch.cat([self.codebook, self.codebook.new_zeros(len(self.codebook), 1)], 1)
        flat = torch.gather(table, 1, torch.where(rows < 0, table.shape[1] - 1, rows))
        return flat.reshape(self.indices.shape)

    @torch.no_grad()
    def recentre(self, weight: torch.Tensor) -> None:
        """Each centroid <- mean of the float weights in its cluster (empty clusters keep it)."""
        rows = self.indices.reshape(len(self.codebook), -1)
        w = weight.detach().reshape(rows.shape)
        valid = rows >= 0
        slot = torch.where(valid, rows, 0)
        sums = torch.zeros_like(self.codebook).scatter_add_(1, slot, torch.where(valid, w, 0))
        counts = torch.zeros_like(self.codebook).scatter_add_(1, slot, valid.to(w.dtype))
        self.codebook.copy_(torch.where(counts > 0, sums / counts.clamp(min=1), self.codebook))

    def storage_bits(self, weight: torch.Tensor) -> int:
        """ceil(log2 k) bits per index (one more code when weights are pruned: the zero) plus
        the float32 codebook; Huffman coding of the indices is reported separately."""
        symbols = self.codebook.shape[-1] + int(bool((self.indices < 0).any()))
        return max(1, math.ceil(math.log2(symbols))) * self.indices.numel() + \
            32 * self.codebook.numel()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.indices.numel() == 0:
            raise ConfigError(f"k-means quantizer {self.name} was never clustered")
        if self.update == "recentre":
            return IdentitySTE.apply(weight, self.shared())
        return self.shared()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the codebook parameter is sized at clustering time too
        if prefix + "codebook" in state_dict:
            self.codebook = nn.Parameter(torch.empty_like(state_dict[prefix + "codebook"]),
                                         requires_grad=self.update == "centroid")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        k = self.codebook.shape[-1] if self.codebook.numel() else 2 ** self.bits
        return f"bits={self.bits}, k={k}, per_channel={self.per_channel}, update={self.update}"
