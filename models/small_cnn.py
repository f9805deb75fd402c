"""A small, fast CNN for the built-in dataset: five conv-BN-ReLU layers, about 0.14 M parameters."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalize
from models.registry import MODELS


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
                 std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.linear = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.linear(self.features(self.normalize(x)))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
              std: Sequence[float] = CIFAR_STD) -> nn.Module:
    return SmallCNN(num_classes, mean, std)
