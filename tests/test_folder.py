"""Image folders in ImageNet's layout, decoded lazily (lowbit.data.folder)."""
import numpy as np
import pytest
import torch

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.data.folder import decode
from lowbit.errors import DataError
from tests.user_models import UserNet, trained_like


def write_folder(root, sizes=((20, 30), (32, 24), (18, 18)), test_dir="val", per_class=3):
    """``root/{train,val}/{cat,dog}``: JPEG and PNG images of the given (width, height)s."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", test_dir):
        for label, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                suffix = ".jpg" if i % 2 else ".png"
                Image.fromarray(pixels).save(root / split / cls / f"{i}{suffix}")
    return root


def test_mixed_sizes_are_resized_and_center_cropped(tmp_path):
    d = load_dataset(f"folder={write_folder(tmp_path)}", input_size=16, workers=0)
    assert d.num_classes == 2 and len(d.train) == 6 and len(d.test) == 6
    x, y = next(iter(Batches(d.test, ((0.5,) * 3, (0.25,) * 3), 4)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 1]


def test_the_crop_is_torchvisions_evaluation_transform(tmp_path):
    """Shorter side to int(S / 0.875), then the centre S x S: a 40 x 20 image whose column index
    is its value keeps the middle columns."""
    from PIL import Image

    columns = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3))
    Image.fromarray(columns).save(tmp_path / "wide.png")
    pixels = decode(tmp_path / "wide.png", 14)  # resized to 32 x 16, then columns 9..22
    assert pixels.shape == (3, 14, 14)
    assert abs(int(pixels[0, 7, 7]) - 6 * 20) <= 12  # the centre column stays in the centre


def test_streaming_decodes_batch_by_batch_with_workers(tmp_path):
    d = load_dataset(f"folder={write_folder(tmp_path, per_class=20)}", input_size=12, workers=2)
    batches = Batches(d.train, ((0.5,) * 3, (0.25,) * 3), 8)
    model = trained_like(UserNet())
    q = lowbit.quantize(model, lowbit.PTQConfig(calib=32, calib_batch_size=8), batches)
    assert 0 <= lowbit.evaluate(q, Batches(d.test, ((0.5,) * 3, (0.25,) * 3), 8)) <= 100
    assert d.train._images is None  # never decoded as one tensor


def test_mixed_sizes_without_input_size_name_the_file(tmp_path):
    d = load_dataset(f"folder={write_folder(tmp_path, sizes=((16, 16), (16, 16), (20, 16)))}",
                     workers=0)
    with pytest.raises(DataError, match=r"2\.png is 20x16, expected 16x16 .* --input-size"):
        list(Batches(d.train, None, 4))


def test_non_images_are_skipped_with_a_count_and_corrupt_ones_named(tmp_path):
    root = write_folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.warns(UserWarning, match="skipped 1 files"):
        d = load_dataset(f"folder={root}", input_size=8, workers=2)
    assert len(d.train) == 6
    with pytest.raises(DataError, match="cannot read image .*broken.jpg"):
        list(Batches(d.test, None, 4))


@pytest.mark.parametrize("layout, message", [
    ("no-val", "needs train/ and val/"), ("no-classes", "has no class sub-folders"),
    ("empty-class", "no images under"),
])
def test_bad_folders_say_what_is_missing(tmp_path, layout, message):
    (tmp_path / "train").mkdir()
    if layout != "no-val":
        (tmp_path / "test").mkdir()
    if layout == "empty-class":
        (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=message):
        load_dataset(f"folder={tmp_path}")


def test_a_folder_trains_in_memory_and_test_folder_works(tmp_path):
    d = load_dataset(f"folder={write_folder(tmp_path, test_dir='test')}", input_size=8,
                     workers=0)
    assert d.train.images.shape == (6, 3, 8, 8) and d.train.images.dtype == torch.uint8
    mean, std = d.normalization()
    assert len(mean) == 3 and all(s > 0 for s in std)
