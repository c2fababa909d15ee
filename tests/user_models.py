"""Small models that exercise what a user's model may contain."""
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class UserNet(nn.Module):
    """Residuals, depthwise + grouped convs, functional ReLU, nested containers, bias-free Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.ModuleDict({"a": Block(8), "b": nn.Sequential(Block(8), Block(8))})
        self.group = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5, bias=False)

    def forward(self, x):
        x = self.body["b"](self.body["a"](self.stem(x)))
        x = F.relu(self.group(x))
        return self.head(x.mean((2, 3)))


def trained_like(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


class Neck(nn.Module):
    """A detection-style neck with one of every op kind the lowering knows: SiLU, LeakyReLU,
    PReLU, Tanh, GELU, hardtanh and clamp; a dilated depthwise conv; max, average (padding not
    counted) and adaptive pooling; nearest and bilinear upsampling; concat; a batch norm after an
    add (it cannot be folded); a squeeze-excite product; slicing, padding, permute, dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                  nn.SiLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                               nn.LeakyReLU(0.1))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
                               nn.Hardtanh(-1.0, 2.0))
        self.prelu = nn.PReLU(8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(24, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        a = self.a(x)
        b = torch.tanh(self.prelu(self.b(x)))
        up = self.up(F.max_pool2d(a, 2))
        smooth = F.interpolate(F.avg_pool2d(b, 3, stride=2, padding=1, count_include_pad=False),
                               scale_factor=2, mode="bilinear", align_corners=False)
        y = self.fuse(torch.cat([up, smooth, F.gelu(a)], 1))
        y = self.bn(y + x)
        y = y * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1)))
        y = torch.clamp(F.pad(y[:, :, 1:, 1:], (0, 1, 0, 1)), -3.0, 3.0)
        y = F.adaptive_avg_pool2d(y, 2).permute(0, 2, 3, 1).reshape(y.shape[0], -1)
        return self.head(F.dropout(y, 0.1, self.training))


class Branchy(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))


class ConvThen(nn.Module):
    """conv -> ``op`` -> global mean -> linear: one op between two quantized layers."""

    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.op = op
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.op(self.conv(x)).mean((2, 3)))
