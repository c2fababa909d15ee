import gzip
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from lowbit.data import Batches, load_dataset
from lowbit.data.idx import read_idx
from lowbit.errors import DataError


def _cifar_batch(n, classes, seed):
    rng = np.random.default_rng(seed)
    key = b"labels" if classes == 10 else b"fine_labels"
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         key: rng.integers(0, classes, n).tolist()})


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("form", ["tar.gz", "tar.xz", "folder"])
def test_cifar_from_archive_or_folder(tmp_path, monkeypatch, classes, form):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    top = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    members = {"data_batch_1": 20, "test_batch": 10} if classes == 10 else {"train": 20, "test": 10}
    folder = tmp_path / "src" / top
    folder.mkdir(parents=True)
    for i, (name, n) in enumerate(members.items()):
        (folder / name).write_bytes(_cifar_batch(n, classes, i))
    if form == "folder":
        path = tmp_path / "src"
    else:
        path = tmp_path / f"cifar.{form}"
        with tarfile.open(path, "w:" + form.split(".")[1]) as tar:
            tar.add(folder, arcname=top)
    d = load_dataset(f"cifar{classes}={path}")
    assert d.train.images.shape == (20, 3, 32, 32) and len(d.test) == 10
    assert d.train.images.dtype == torch.uint8 and int(d.train.labels.max()) < classes
    again = load_dataset(f"cifar{classes}={path}")  # from the cache
    assert torch.equal(again.train.images, d.train.images)


def test_cifar_cache_written_by_parallel_loaders(tmp_path, monkeypatch):
    """Loaders decoding the same archive at once (processes in the benchmarks, threads here)
    each write their own temporary file, and one cache file is left."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(_cifar_batch(2000, 10, 0))
    (folder / "test_batch").write_bytes(_cifar_batch(10, 10, 1))
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_dataset(f"cifar10={tmp_path / 'src'}"), range(8)))
    assert all(torch.equal(d.train.images, loaded[0].train.images) for d in loaded)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]


def test_corrupt_cifar_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="cannot read CIFAR archive"):
        load_dataset(f"cifar10={bad}")


def _write_idx(path, array, gz):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, dtype_code, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    blob = header + array.tobytes()
    (gzip.open(path, "wb") if gz else open(path, "wb")).write(blob)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n).astype(np.uint8), gz)
    d = load_dataset(f"mnist={tmp_path}")
    assert d.train.images.shape == (30, 1, 28, 28) and len(d.test) == 12
    assert read_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}").shape == (12,)


def test_truncated_idx(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">i4").tobytes() + b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_image_folder(tmp_path):
    from PIL import Image
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6, 3), i * 40, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset(f"folder={tmp_path}")
    assert d.train.images.shape == (6, 3, 6, 6) and d.num_classes == 2
    assert d.test.labels.tolist() == [0, 0, 1, 1]


def test_digits_and_batches():
    d = load_dataset("digits")
    assert d.train.images.shape[1:] == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    x, y = next(iter(Batches(d.test, d.normalization(), 64)))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_unknown_dataset_and_missing_path():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet=/x")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("cifar10")
