"""The embedded default: UCI handwritten digits as shipped by scikit-learn (1,797 real 8x8
images, 10 classes, no download). Split 80 / 20 with a fixed seed."""
from __future__ import annotations

import numpy as np
import torch

from lowbit.data.core import Dataset, Split


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # pixels are 0..16
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    x, y = torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64))
    return Dataset("digits", Split(x[train], y[train]), Split(x[test], y[test]), 10)
