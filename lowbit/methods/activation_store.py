"""Activation caches for layer-by-layer calibration: in memory up to a budget, on disk beyond.

Calibration keeps, for the block of the network being calibrated, its input on every
calibration image (and, for AdaRound, one layer's input and float output). A
:class:`MemoryBudget` is shared by every :class:`ActivationStore` of one calibration run: a batch
is held in memory while the budget allows and otherwise written to a temporary directory as one
``.npy`` file, read back when used. The directory is ``tempfile``'s (``TMPDIR``) and is removed
when the run ends, error or not. On a GPU the budget counts GPU memory: batches stay on their
device while they fit, and a spilled batch comes back to the device it left.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import ConfigError, DataError

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6,
          "mib": 2 ** 20, "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12,
          "tib": 2 ** 40}


def parse_bytes(value) -> int:
    """``2147483648``, ``"2GiB"``, ``"512 MB"``, ``"1.5g"`` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"a memory size must be a number of bytes or e.g. '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"a memory size must be a number of bytes or e.g. '2GiB', "
                              f"got {value!r}")
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < 0:
        raise ConfigError(f"a memory size cannot be negative, got {value!r}")
    return int(size)


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


class MemoryBudget:
    """Bytes of cached activations allowed in memory, and the spill directory beyond them."""

    def __init__(self, limit: int):
        self.limit, self.used, self.spilled = limit, 0, 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self._files = 0

    def hold(self, n: int) -> bool:
        """Reserve ``n`` bytes in memory if they fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n

    def spill(self, array: np.ndarray, what: str) -> Path:
        """Write ``array`` to a new file of the spill directory."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lowbit-calib-")
        directory = Path(self._dir.name)
        free = shutil.disk_usage(directory).free
        if array.nbytes > free:
            raise DataError(f"calibration cannot cache {what}: it needs {gib(array.nbytes)} more "
                            f"than the memory budget ({gib(self.limit)}), and {directory} has "
                            f"{gib(free)} free; raise --calib-memory, free disk space, set TMPDIR "
                            "to a larger disk, or use fewer calibration images")
        path = directory / f"{self._files}.npy"
        self._files += 1
        np.save(path, array)
        self.spilled += array.nbytes
        return path

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "MemoryBudget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActivationStore:
    """A sequence of batches (tensors with the image on axis 0) in memory or spilled; ``what``
    names it in errors."""

    def __init__(self, budget: MemoryBudget, what: str):
        self.budget, self.what = budget, what
        self._batches: list[torch.Tensor | tuple[Path, torch.device]] = []
        self._sizes: list[int] = []
        self._held = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.budget.hold(nbytes):
            self._batches.append(t)
            self._held += nbytes
        else:
            self._batches.append((self.budget.spill(t.cpu().numpy(), self.what), t.device))
        self._sizes.append(len(t))

    def __len__(self) -> int:
        return sum(self._sizes)

    @property
    def batches(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for item in self._batches:
            yield torch.from_numpy(np.load(item[0])).to(item[1]) if isinstance(item, tuple) \
                else item

    def clear(self) -> None:
        """Forget the batches: their memory goes back to the budget, their files are deleted."""
        self.budget.release(self._held)
        for item in self._batches:
            if isinstance(item, tuple):
                item[0].unlink(missing_ok=True)
        self._batches, self._sizes, self._held = [], [], 0
