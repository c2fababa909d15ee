"""MobileNetV2 (Sandler et al., CVPR 2018) for 32 x 32 inputs: the hardest standard PTQ case,
a depthwise-separable network with ReLU6 and linear bottlenecks.

The layer table is torchvision's ``mobilenet_v2`` (inverted residual blocks of expansion t,
width c, n repeats, first stride s; widths rounded to multiples of 8 after ``width_mult``) with
the usual CIFAR stem: stride 1 in the first convolution and in the first strided stage
(``(6, 24, 2, 2)`` becomes stride 1), so a 32 px image reaches the last stage at 4 x 4 instead of
1 x 1. Names follow torchvision (``features.N``, ``classifier.1``), so its checkpoints' layout
and lowbit's layer policy (first conv, last linear) read the same.
"""
from __future__ import annotations

from torch import nn

# (expansion t, output channels c, repeats n, first stride s); torchvision's, CIFAR strides
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of 8, never below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion (t > 1) -> 3x3 depthwise -> 1x1 linear projection, with the identity
    shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [_conv_bn(cin, hidden, 1, 1)] if expansion != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        features = [_conv_bn(3, cin, 3, 1)]
        for t, c, n, s in SETTINGS:
            cout = _divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn(cin, last, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenet_v2_cifar(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(num_classes)


def mobilenet_v2_cifar_050(num_classes: int = 100) -> MobileNetV2:
    """Width 0.5: a quarter of the multiply-adds (public 200-epoch CIFAR-100 runs: 70.9%)."""
    return MobileNetV2(num_classes, width_mult=0.5)
