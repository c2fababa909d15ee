import os
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
