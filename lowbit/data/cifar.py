"""CIFAR-10 / CIFAR-100 from the official python-pickle release.

Accepts the official ``.tar.gz``, any tar compression (the ``.tar.xz`` copies in ``../shared``),
or an extracted folder. Decoding an archive is slow, so the decoded arrays are cached as ``.npz``
under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), keyed by the archive's path, size and mtime.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowbit.data.core import Dataset, Split
from lowbit.errors import DataError


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _member_role(name: str, classes: int) -> str | None:
    base = os.path.basename(name)
    if classes == 10:
        return "train" if base.startswith("data_batch_") else "test" if base == "test_batch" else None
    return base if base in ("train", "test") else None


def _decode(blob: bytes, name: str, classes: int):
    try:
        d = pickle.load(io.BytesIO(blob), encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels" if classes == 10 else b"fine_labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"corrupt CIFAR-{classes} member {name}: {type(e).__name__}: {e}") from None
    return data, labels


def _read_members(path: Path, classes: int) -> dict:
    parts = {"train": [], "test": []}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            role = _member_role(f.name, classes)
            if role and f.is_file():
                parts[role].append(_decode(f.read_bytes(), f.name, classes))
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    role = _member_role(m.name, classes)
                    if role and m.isfile():
                        parts[role].append(_decode(tar.extractfile(m).read(), m.name, classes))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"cannot read CIFAR archive {path}: {e}") from None
    if not parts["test"]:
        raise DataError(f"no CIFAR-{classes} test batch found in {path}")
    return parts


def load_cifar(path, classes: int = 10) -> Dataset:
    """Load CIFAR-``classes`` (10 or 100); the train split holds whatever training batches exist."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"CIFAR path not found: {path}")
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{classes}".encode())
    cached = cache_dir() / f"cifar{classes}-{key.hexdigest()[:16]}.npz"
    if cached.is_file():
        z = np.load(cached)
        arrays = {k: z[k] for k in z.files}
    else:
        parts = _read_members(path, classes)
        arrays = {}
        for role, chunks in parts.items():
            arrays[f"{role}_x"] = (np.concatenate([c[0] for c in chunks]) if chunks
                                   else np.zeros((0, 3, 32, 32), np.uint8))
            arrays[f"{role}_y"] = (np.concatenate([c[1] for c in chunks]) if chunks
                                   else np.zeros((0,), np.int64))
        cached.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: two processes decoding the same archive at once (parallel
        # benchmark runs) must not rename each other's half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=cached.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    split = {r: Split(torch.from_numpy(arrays[f"{r}_x"]), torch.from_numpy(arrays[f"{r}_y"]))
             for r in ("train", "test")}
    return Dataset(f"cifar{classes}", split["train"], split["test"], classes)
