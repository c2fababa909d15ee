"""Dataset containers, the ``name=PATH`` spec, and normalized batch iteration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import DataError


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self):
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.images[:n], self.labels[:n])

    def subset(self, n: int, seed: int = 0) -> "Split":
        """``n`` distinct examples drawn with a seeded permutation."""
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    def normalization(self):
        """Per-channel (mean, std) of the training images scaled to [0, 1]."""
        x = self.train.images.float() / 255.0
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp(min=1e-3).tolist())


def normalization_tensors(normalization, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) shaped [1, C, 1, 1] from ``((mean...), (std...))``; None means identity."""
    mean, std = normalization if normalization else ((0.0,) * channels, (1.0,) * channels)
    if len(mean) != channels:
        raise DataError(f"normalization has {len(mean)} channels but the images have {channels}")
    return torch.tensor(mean).reshape(1, -1, 1, 1), torch.tensor(std).reshape(1, -1, 1, 1)


class Batches:
    """Iterate ``(x, y)`` float batches normalized as ``(pixel / 255 - mean) / std``."""

    def __init__(self, split: Split, normalization, batch_size: int = 256, shuffle: bool = False,
                 seed: int = 0):
        if len(split) == 0:
            raise DataError("the dataset split is empty")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.mean, self.std = normalization_tensors(normalization, split.images.shape[1])
        self.epoch = 0

    def __len__(self):
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.split)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self.epoch += 1
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            x = (self.split.images[idx].float() / 255.0 - self.mean) / self.std
            yield x, self.split.labels[idx]


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10=PATH"`` -> ("cifar10", "PATH"); ``"digits"`` -> ("digits", None)."""
    name, _, path = spec.partition("=")
    return name.strip().lower(), (path or None)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset from ``name=PATH`` (cifar10, cifar100, mnist, folder) or ``digits``."""
    from lowbit.data import cifar, digits, folder, idx

    name, path = parse_data_spec(spec)
    loaders = {"cifar10": lambda p: cifar.load_cifar(p, 10), "cifar100": lambda p: cifar.load_cifar(p, 100),
               "mnist": idx.load_mnist, "folder": folder.load_folder}
    if name == "digits":
        return digits.load_digits()
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}: use cifar10=PATH, cifar100=PATH, mnist=PATH, "
                        "folder=PATH or digits")
    if path is None:
        raise DataError(f"dataset {name} needs a path: {name}=PATH")
    return loaders[name](path)
