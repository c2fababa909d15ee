"""A small CNN for 8x8 single-channel images (the embedded UCI digits demo)."""
from __future__ import annotations

from torch import nn


def digits_cnn(num_classes: int = 10):
    """conv(1->16) BN ReLU, conv(16->32, stride 2) BN ReLU, conv(32->32) BN ReLU, pool, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )
