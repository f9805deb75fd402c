"""Shared pieces of the quant tests: tiny nets, BN warm-up, random pixel batches (all through fixtures, so
no test imports this file)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Three quantized layers (first, middle, last), so per-layer bit widths are all visible."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=cout, bias=False)  # depthwise, as in MobileNet
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class UserResNet(nn.Module):
    """A user's own residual net, not from the zoo. The classifier is registered first on purpose: the
    execution order, not the registration order, decides which layer is last."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.head = nn.Linear(32, num_classes)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = ResidualBlock(16, 16)
        self.block2 = ResidualBlock(16, 32, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def warm_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give a random model BN statistics of its own activations (as a trained one has); return it in eval."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch sets the statistics exactly
    with torch.no_grad():
        model(x)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test in this folder runs on one thread (tests/conftest.py says why)."""


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny(pixels: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(TinyNet(), pixels)


@pytest.fixture
def user_resnet(pixels: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return warm_bn(UserResNet(), pixels)


@pytest.fixture
def warm():
    """`warm(model, x)`: a random model with BN statistics of its own activations, in eval mode."""
    return warm_bn


@pytest.fixture
def rel_error():
    return relative_error
