"""CIFAR MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks.

The block table is the paper's Table 2 at width 1.0. For 32x32 inputs the stem has stride 1 and the second
stage (24 channels) stride 1 instead of 2, the usual CIFAR change, so the map shrinks 32 -> 16 -> 8 -> 4 and
the head pools a 4x4 map. About 2.24 M parameters.

Activations are plain `nn.ReLU`, not the paper's ReLU6: the clip at 6 adds a second, fixed range that a
low-bit activation quantizer must respect, and a calibrated ReLU quantizer bounds the range anyway. Like
the paper (and torchvision), a block adds its input only when stride is 1 and the width is unchanged, and
an expansion-1 block has no expanding 1x1 conv.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalize
from models.registry import MODELS

# (expansion t, output channels c, blocks n, stride s of the first block), as in the paper's Table 2,
# except s = 1 for the 24-channel stage (CIFAR).
MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Expand (1x1 conv-BN-ReLU), filter (3x3 depthwise conv-BN-ReLU), project (1x1 conv-BN, no ReLU).

    The projection stays linear: a ReLU on the narrow bottleneck would destroy information (section 3.2).
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand:
            out = self.relu1(self.bn1(self.conv1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    def __init__(self, stages: Sequence[tuple[int, int, int, int]] = MOBILENETV2_STAGES,
                 num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
                 std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)  # stride 1 on 32x32 (ImageNet: 2)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = 32
        for expansion, cout, depth, stride in stages:
            for j in range(depth):
                blocks.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expansion))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.flatten(self.avgpool(out)))


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
                std: Sequence[float] = CIFAR_STD) -> nn.Module:
    """CIFAR MobileNetV2 with plain ReLU: 2.24 M parameters."""
    return MobileNetV2(MOBILENETV2_STAGES, num_classes, mean, std)
