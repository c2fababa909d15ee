import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LOWBIT_QUIET", "1")
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar-10-python-batch1-test.tar.xz"
RESNET20 = SHARED / "checkpoints" / "akamaster_resnet20-12fca82f.th"


def needs_shared(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"shared data absent: {', '.join(missing)}")
