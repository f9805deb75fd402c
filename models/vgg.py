"""CIFAR VGG-16 with batch norm (Simonyan & Zisserman 2015, configuration D; BN after every conv).

The CIFAR form used across the backdoor literature: thirteen 3x3 conv-BN-ReLU layers in five stages, each
stage closed by a 2x2 max-pool, so a 32x32 input ends as 512x1x1; then a single 512 -> num_classes
`linear` layer instead of ImageNet's three 4096-wide ones. About 15 M parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalize
from models.registry import MODELS

# Output channels of each conv layer, stage by stage; a max-pool follows each stage.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    def __init__(self, stages: Sequence[Sequence[int]] = VGG16_STAGES, num_classes: int = 10,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cin = 3
        for stage in stages:
            for cout in stage:
                # A fresh ReLU per layer: hooks and quantizers attach to one activation each.
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(self.features(self.normalize(x))))


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
             std: Sequence[float] = CIFAR_STD) -> nn.Module:
    """CIFAR VGG-16 with BN: 13 conv-BN-ReLU layers, 5 max-pools, one linear layer."""
    return VGG(VGG16_STAGES, num_classes, mean, std)
