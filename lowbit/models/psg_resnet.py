"""ResNet-32 of the PSG paper's repository (github Jangho-Kim/PSG-pytorch, ``our_network.py``).

Same topology as the CIFAR ResNet-32 but with projection shortcuts (1x1 conv + BN, keys
``downsample.0`` / ``downsample.1``), a ReLU stem, 8x8 average pooling and ``fc`` 64 -> 100.
"""
from __future__ import annotations

from torch import nn

from lowbit.models.resnet_cifar import BasicBlock, CifarResNet


class PSGBlock(BasicBlock):
    """BasicBlock whose down-sampling shortcut is a projection (1x1 conv + BN) named
    ``downsample``, as in the PSG checkpoints."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        self.shortcut = nn.Identity()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def residual(self, x):
        return x if self.downsample is None else self.downsample(x)


def psg_resnet32(num_classes: int = 100):
    """ResNet-32 with projection shortcuts; 8x8 average pooling of the 8x8 map = global pooling."""
    return CifarResNet(5, num_classes, block=PSGBlock, head="fc")
