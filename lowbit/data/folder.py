"""An image folder in ImageNet's layout, decoded lazily: ``ROOT/train/<class>/<image>`` and
``ROOT/val/<class>/...`` (or ``test/``); the class is the sub-folder name, in sorted order.

Only the file list is read at load time. Pixels are decoded when a batch is drawn, by a
``torch.utils.data.DataLoader`` with ``workers`` processes, so a 50,000-image validation folder
is evaluated in constant memory. With ``input_size`` S every image gets torchvision's evaluation
transform: the shorter side resized (bilinear) to ``int(S / 0.875)`` (256 for 224), then the
centre ``S x S`` crop. Without it every image must already have one size; the first that does
not is named (give ``--input-size``).

Files whose suffix is not an image's are skipped, with one warning giving their number; a file
that cannot be decoded fails, naming it. Training reads a split in memory
(:attr:`FolderSplit.images` decodes it whole); quantization and evaluation stream it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lowbit.data.core import Dataset
from lowbit.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CROP_FRACTION = 0.875  # torchvision's evaluation transform: Resize(256), CenterCrop(224)


def decode(path: Path, size: int | None) -> np.ndarray:
    """The RGB pixels of ``path`` as a uint8 ``[3, H, W]`` array, resized and centre-cropped to
    ``size`` x ``size`` when given."""
    from PIL import Image  # Pillow comes with matplotlib

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                w, h = img.size
                short = int(size / CROP_FRACTION)
                new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
                img = img.resize(new, Image.BILINEAR)
                left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
                img = img.crop((left, top, left + size, top + size))
            return np.asarray(img).transpose(2, 0, 1).copy()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class _Decoded(torch.utils.data.Dataset):
    """Items ``(pixels, label, error)``: a decoding error travels back as text, so the main
    process raises it as one DataError naming the file (not a worker traceback)."""

    def __init__(self, split: "FolderSplit"):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        path, size = self.split.files[i], self.split.size
        try:
            pixels = decode(path, size)
        except DataError as e:
            return torch.zeros(0, dtype=torch.uint8), -1, str(e)
        if size is None and pixels.shape != self.split.shape:
            return torch.zeros(0, dtype=torch.uint8), -1, (
                f"{path} is {pixels.shape[2]}x{pixels.shape[1]}, expected "
                f"{self.split.shape[2]}x{self.split.shape[1]} like the other images; give "
                "--input-size to resize and crop every image to one size")
        return torch.from_numpy(pixels), int(self.split.labels[i]), ""


def _collate(items):
    errors = [e for _, _, e in items if e]
    if errors:
        return None, None, errors[0]
    return torch.stack([p for p, _, _ in items]), torch.tensor([y for _, y, _ in items]), ""


class FolderSplit:
    """One split of an image folder: its files and labels, decoded on demand (module
    docstring). Has the interface of :class:`lowbit.data.core.Split`."""

    def __init__(self, files: list[Path], labels: torch.Tensor, size: int | None,
                 workers: int, shape: tuple | None = None):
        self.files, self.labels, self.size, self.workers = files, labels, size, workers
        self.shape = shape if shape is not None or size is not None or not files \
            else decode(files[0], None).shape
        self._images = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def channels(self) -> int:
        return 3

    def _take(self, idx) -> "FolderSplit":
        return FolderSplit([self.files[i] for i in idx], self.labels[idx], self.size,
                           self.workers, self.shape)

    def head(self, n: int | None) -> "FolderSplit":
        return self if n is None else self._take(torch.arange(min(n, len(self))))

    def subset(self, n: int, seed: int = 0) -> "FolderSplit":
        """``n`` distinct examples drawn with a seeded permutation."""
        return self._take(torch.randperm(len(self), generator=torch.Generator()
                                         .manual_seed(seed))[:n])

    def batches(self, order: torch.Tensor, batch_size: int):
        """``(uint8 images, labels)`` batches in ``order``, decoded by the workers."""
        loader = DataLoader(_Decoded(self._take(order)), batch_size=batch_size,
                            num_workers=self.workers, collate_fn=_collate)
        for images, labels, error in loader:
            if error:
                raise DataError(error)
            yield images, labels

    @property
    def images(self) -> torch.Tensor:
        """Every image of the split, decoded into one uint8 tensor (for training)."""
        if self._images is None:
            self._images = torch.cat([x for x, _ in self.batches(torch.arange(len(self)), 256)])
        return self._images


def _list_split(root: Path, classes: list[str]) -> tuple[list[Path], list[int], int]:
    files, labels, skipped = [], [], 0
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
            if f.is_file() and f.suffix.lower() in SUFFIXES:
                files.append(f)
                labels.append(label)
            elif f.is_file():
                skipped += 1
    if not files:
        raise DataError(f"no images under {root} (one sub-folder of images per class)")
    return files, labels, skipped


def load_folder(path, input_size: int | None = None, workers: int | None = None) -> Dataset:
    root = Path(path)
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test is None:
        raise DataError(f"{root} needs train/ and val/ (or test/) sub-folders with one folder "
                        "per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class sub-folders (one folder of images per "
                        "class, as ImageNet's train/n01440764/...)")
    if input_size is not None and (isinstance(input_size, bool) or input_size < 1):
        raise DataError(f"--input-size must be a positive number of pixels, got {input_size}")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    splits, skipped = [], 0
    for split_root in (root / "train", test):
        files, labels, n = _list_split(split_root, classes)
        skipped += n
        splits.append(FolderSplit(files, torch.tensor(labels), input_size, workers))
    if skipped:
        warnings.warn(f"{root}: skipped {skipped} files that are not images "
                      f"({', '.join(sorted(SUFFIXES))})", stacklevel=2)
    if input_size is None and splits[0].shape != splits[1].shape:
        raise DataError(f"{root}: train images are {splits[0].shape[2]}x{splits[0].shape[1]} "
                        f"but {test.name} images are {splits[1].shape[2]}x{splits[1].shape[1]}; "
                        "give --input-size")
    return Dataset(root.name, splits[0], splits[1], len(classes))
