"""A folder of images: ``ROOT/{train,test}/<class>/*.png|jpg`` (class = sub-folder name)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.data.core import Dataset, Split
from lowbit.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _read_split(root: Path, classes: list[str]) -> Split:
    from PIL import Image  # Pillow comes with matplotlib

    images, labels, size = [], [], None
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
            if f.suffix.lower() not in SUFFIXES:
                continue
            try:
                img = np.asarray(Image.open(f).convert("RGB"))
            except OSError as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            if size is None:
                size = img.shape
            elif img.shape != size:
                raise DataError(f"{f} is {img.shape[1]}x{img.shape[0]}, expected "
                                f"{size[1]}x{size[0]} like the other images")
            images.append(img.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"no images under {root}")
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))


def load_folder(path) -> Dataset:
    root = Path(path)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"{root} needs train/ and test/ sub-folders with one folder per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return Dataset(root.name, _read_split(root / "train", classes), _read_split(root / "test", classes),
                   len(classes))
