"""CIFAR ResNets of He et al. 2016 (section 4.2) as in github akamaster/pytorch_resnet_cifar10.

ResNet-N, N = 6n + 2: a 3x3 stem (16 channels), three stages of n BasicBlocks with 16 / 32 / 64
channels (strides 1 / 2 / 2), global average pooling and ``linear`` 64 -> classes. Down-sampling
blocks use the parameter-free option-A shortcut. State_dict keys load the public checkpoints
strictly (after removing their ``module.`` prefix).
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F


class ShortcutA(nn.Module):
    """Option-A shortcut: take every second pixel and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def residual(self, x):
        return self.shortcut(x)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.residual(x))


class CifarResNet(nn.Module):
    """Stem conv + BN + ReLU, three stages of ``block`` (16 / 32 / 64 channels, strides 1 / 2 / 2),
    global average pooling and a linear head stored under ``head`` (``linear`` for akamaster,
    ``fc`` for the PSG repository)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, block=BasicBlock,
                 head: str = "linear"):
        super().__init__()
        self.head = head
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(block(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        setattr(self, head, nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return getattr(self, self.head)(out)


def resnet20(num_classes: int = 10):
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10):
    return CifarResNet(5, num_classes)


def resnet44(num_classes: int = 10):
    return CifarResNet(7, num_classes)


def resnet56(num_classes: int = 10):
    return CifarResNet(9, num_classes)
