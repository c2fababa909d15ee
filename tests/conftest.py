import os
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.user_models import UserNet, trained_like

os.environ.setdefault("LOWBIT_QUIET", "1")
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar-10-python-batch1-test.tar.xz"
RESNET20 = SHARED / "checkpoints" / "akamaster_resnet20-12fca82f.th"


def needs_shared(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"shared data absent: {', '.join(missing)}")


@pytest.fixture
def user_model():
    return trained_like(UserNet())


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 12, 12, generator=g) for _ in range(4)]


@pytest.fixture(scope="session")
def digits_fp():
    """(the embedded digits, a small CNN trained on them): a float model for method tests."""
    from lowbit.data.digits import load_digits
    from lowbit.models import build_model
    from lowbit.training import TrainConfig, train

    d = load_digits()
    torch.manual_seed(0)
    config = TrainConfig(epochs=10, batch_size=64, optimizer="adam", lr=3e-3, augment=False)
    return d, train(build_model("digits_cnn"), d, d.normalization(), config).model


@pytest.fixture(scope="session")
def torchvision_models():
    """``torchvision.models`` (skips when torchvision is absent)."""
    # torchvision's compiled ops cannot load on this CPU build of torch; its model definitions
    # are pure Python and import once the module registering those ops is replaced by an empty
    # one (tests only: users have a working torchvision).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision.models")
