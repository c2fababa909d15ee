"""Dataset containers, the ``name=PATH`` spec, and normalized batch iteration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import DataError


NORMALIZATION_SAMPLE = 1024


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

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batches(self, order: torch.Tensor, batch_size: int):
        """``(uint8 images, labels)`` batches in ``order``."""
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.images[idx], self.labels[idx]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    def normalization(self):
        """Per-channel (mean, std) of the training images scaled to [0, 1] (for a streamed
        image folder, of a seeded sample of :data:`NORMALIZATION_SAMPLE` of them)."""
        if getattr(self, "_normalization", None) is None:
            train = self.train if isinstance(self.train, Split) \
                else self.train.subset(NORMALIZATION_SAMPLE, seed=0)
            x = train.images.float() / 255.0
            self._normalization = (tuple(x.mean((0, 2, 3)).tolist()),
                                   tuple(x.std((0, 2, 3)).clamp(min=1e-3).tolist()))
        return self._normalization


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
        self.mean, self.std = normalization_tensors(normalization, split.channels)
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
        for images, labels in self.split.batches(order, self.batch_size):
            yield (images.float() / 255.0 - self.mean) / self.std, labels


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10=PATH"`` -> ("cifar10", "PATH"); ``"digits"`` -> ("digits", None)."""
    name, _, path = spec.partition("=")
    return name.strip().lower(), (path or None)


def load_dataset(spec: str, input_size: int | None = None, workers: int | None = None) -> Dataset:
    """Load a dataset from ``name=PATH`` (cifar10, cifar100, mnist, folder) or ``digits``;
    ``input_size`` and ``workers`` apply to ``folder`` (streamed: :mod:`lowbit.data.folder`)."""
    from lowbit.data import cifar, digits, folder, idx

    name, path = parse_data_spec(spec)
    loaders = {"cifar10": lambda p: cifar.load_cifar(p, 10), "cifar100": lambda p: cifar.load_cifar(p, 100),
               "mnist": idx.load_mnist,
               "folder": lambda p: folder.load_folder(p, input_size, workers)}
    if name == "digits":
        return digits.load_digits()
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}: use cifar10=PATH, cifar100=PATH, mnist=PATH, "
                        "folder=PATH or digits")
    if path is None:
        raise DataError(f"dataset {name} needs a path: {name}=PATH")
    return loaders[name](path)
