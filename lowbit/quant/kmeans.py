"""K-means weight sharing (Han, Mao, Dally, "Deep Compression", ICLR 2016; ALGORITHMS.md 4.1).

Per layer (or per output channel), the non-pruned weights are clustered into k = 2^bits
centroids by 1-D k-means (Lloyd's algorithm), minimising sum_k sum_{w in c_k} |w - C_k|^2; each
weight is then stored as an index into the fp32 codebook C and computed as C[index].

Initialisation: ``linear`` (evenly spaced between min and max: the paper's best, it keeps the
large weights), ``density`` (evenly spaced in the weights' CDF) or ``kmeans++`` (Arthur &
Vassilvitskii 2007). Written in torch (not scikit-learn) so large layers are fast and it runs on
the GPU: in 1-D the nearest centroid is found by ``bucketize`` against the midpoints of the
sorted centroids, O(N log k) with no N x k distance matrix.
"""
from __future__ import annotations

import heapq
import warnings
from collections import Counter

import torch

from lowbit.errors import ConfigError

INITS = ("linear", "density", "kmeans++")


def initial_centroids(w: torch.Tensor, k: int, init: str = "linear",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """k starting centroids for the 1-D values ``w``."""
    if init == "linear":
        return torch.linspace(w.min().item(), w.max().item(), k, dtype=w.dtype, device=w.device)
    if init == "density":
        q = torch.linspace(0, 1, k, dtype=w.dtype, device=w.device)
        return torch.quantile(w, q)
    if init == "kmeans++":
        centroids = [w[torch.randint(len(w), (1,), generator=generator)].item()]
        for _ in range(k - 1):
            d2 = (w[:, None] - torch.tensor(centroids, dtype=w.dtype, device=w.device)).pow(2)
            p = d2.min(1).values
            if p.sum() <= 0:
                p = torch.ones_like(p)
            i = torch.multinomial(p.cpu(), 1, generator=generator).item()
            centroids.append(w[i].item())
        return torch.tensor(sorted(centroids), dtype=w.dtype, device=w.device)
    raise ConfigError(f"k-means init must be one of {', '.join(INITS)}, got {init!r}")


def assign(w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(w, midpoints)


def kmeans_1d(w: torch.Tensor, k: int, init: str = "linear", max_iter: int = 300,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted centroids [k], labels [N]) of Lloyd's algorithm on the 1-D values ``w``, run
    until no label changes. An empty cluster keeps its centroid."""
    w = w.detach().flatten()
    centroids = initial_centroids(w, k, init, generator).sort().values
    labels = assign(w, centroids)
    for _ in range(max_iter):
        sums = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, labels, w)
        counts = torch.bincount(labels, minlength=k).to(w.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        order = centroids.argsort()
        centroids = centroids[order]
        new = assign(w, centroids)
        if torch.equal(new, labels) and torch.equal(order, torch.arange(k, device=w.device)):
            break
        labels = new
    return centroids, labels


def cluster_weights(weight: torch.Tensor, bits: int, init: str = "linear",
                    per_channel: bool = False, prune_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, name: str = "weight"):
    """Codebook(s) and indices for a weight tensor.

    Returns ``(codebook [rows, k], indices like weight (int64), k)`` with one row per output
    channel if ``per_channel`` else a single row. Pruned weights (``prune_mask`` True) are left
    out of the clustering and get index -1 (they stay exactly 0). When a row has fewer distinct
    values than 2^bits, k shrinks to that number and a warning says so.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"k-means bits must be an integer from 1 to 16, got {bits!r}")
    w = weight.detach()
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    keep = torch.ones_like(rows, dtype=torch.bool) if prune_mask is None else \
        ~prune_mask.reshape(rows.shape)
    k = 2 ** bits
    distinct = max(int(torch.unique(r[m]).numel()) for r, m in zip(rows, keep)) if keep.any() else 0
    if distinct < k:
        warnings.warn(f"{name}: {distinct} distinct weights for {k} clusters; using k = "
                      f"{max(distinct, 1)} (each distinct value is its own centroid)",
                      stacklevel=2)
        k = max(distinct, 1)
    codebook = torch.zeros(rows.shape[0], k, dtype=w.dtype, device=w.device)
    indices = torch.full(rows.shape, -1, dtype=torch.int64, device=w.device)
    for i, (row, m) in enumerate(zip(rows, keep)):
        values = row[m]
        if values.numel() == 0:
            continue
        if torch.unique(values).numel() <= k:
            uniq = torch.unique(values)
            centroids = torch.cat([uniq, uniq[-1:].expand(k - uniq.numel())])
            labels = assign(values, centroids)
        else:
            centroids, labels = kmeans_1d(values, k, init, generator=generator)
        codebook[i] = centroids
        indices[i, m] = labels
    return codebook, indices.reshape(w.shape), k


def huffman_bits(symbols: torch.Tensor) -> int:
    """Total length in bits of the Huffman coding of ``symbols`` (Deep Compression's last
    stage), from the code lengths of a standard Huffman tree (heapq; a single symbol costs 1
    bit per occurrence)."""
    counts = Counter(symbols.flatten().tolist())
    if len(counts) == 1:
        return sum(counts.values())
    heap = [(c, i, {s: 0}) for i, (s, c) in enumerate(counts.items())]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        merged = {s: d + 1 for s, d in {**a, **b}.items()}
        heapq.heappush(heap, (c1 + c2, tie, merged))
        tie += 1
    lengths = heap[0][2]
    return sum(counts[s] * lengths[s] for s in counts)
