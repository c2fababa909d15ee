"""MNIST-family datasets (MNIST, Fashion-MNIST, KMNIST) in the idx format, gzipped or raw."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lowbit.data.core import Dataset, Split
from lowbit.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Parse one idx file: magic (0, 0, dtype, ndim), ndim big-endian int32 sizes, then data."""
    path = Path(path)
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, _DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} values for shape {tuple(dims)}")
    return data.reshape(tuple(int(d) for d in dims))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise DataError(f"{stem}[.gz] not found under {root}")


def load_mnist(path) -> Dataset:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"MNIST folder not found: {root}")
    splits = {}
    for role, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte")).astype(np.uint8)
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{role}: {len(x)} images but {len(y)} labels")
        splits[role] = Split(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.copy()))
    classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    return Dataset("mnist", splits["train"], splits["test"], classes)
