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
