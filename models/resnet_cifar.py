"""CIFAR ResNets: ResNet-20 (He et al. 2016, "option A") and the ResNet-18 of the backdoor literature.

Both take 3x32x32 pixels in [0, 1]. Every activation is its own `nn.ReLU` instance and every residual add
is a plain `out = out + shortcut` right before the block's last ReLU, so per-layer hooks, torch.fx tracing
and Brevitas's residual-scale alignment all see one module per activation and one add per block.

ResNet-20 follows the CIFAR-10 recipe of the ResNet paper (section 4.2): a 3x3 stem with 16 channels, three
stages of three basic blocks (16, 32, 64 channels; stride 2 at the start of stages 2 and 3) and
parameter-free shortcuts. Its module names match the widely used pretrained checkpoint that the project
ships as ../shared/checkpoints/resnet20-cifar10-12fca82f.th (`conv1`, `bn1`, `layer{1,2,3}.{0,1,2}.*`,
`linear`), so that file loads without renaming.

ResNet-18 is the variant the QCB papers train on CIFAR-10: ImageNet's four stages of two basic blocks with
64/128/256/512 channels, but a 3x3 stride-1 stem and no max-pool, and 1x1 conv + BN projection shortcuts
where the shape changes (keys `shortcut.0` and `shortcut.1`, as in the common CIFAR code bases).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalize
from models.registry import MODELS


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """ResNet "option A" shortcut: subsample by 2 and zero-pad the channels, with no parameters.

    Shapes: [N, C, H, W] -> [N, C + 2 * pad, ceil(H / 2), ceil(W / 2)], with `pad` zero channels on each
    side. A module rather than a lambda so that it prints, pickles, traces with torch.fx and exports to ONNX
    (a strided Slice and a constant Pad).

    Examples:
        >>> PadShortcut(pad=8)(torch.ones(2, 16, 32, 32)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad's tuple runs from the last dimension backwards: (W left, W right, H top, H bottom, C, C).
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


def _pad_shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Option A: identity, or subsample + zero-pad when the block halves the map and doubles the width."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if stride != 2 or cout != 2 * cin:
        raise ValueError(f"option-A shortcut needs stride 2 and a doubled width, "
                         f"got {cin}->{cout} at stride {stride}")
    return PadShortcut(cout // 4)


def _projection_shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Option B: identity, or a 1x1 conv + BN projection when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class CifarResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks, global average pooling and a `linear` classifier.

    `widths[i]` channels and `depths[i]` blocks in stage i+1; every stage after the first starts with
    stride 2. `shortcut` builds a block's shortcut from (cin, cout, stride).
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int], shortcut, num_classes: int = 10,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, shortcut(cin, width, stride)))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(self.flatten(self.avgpool(out)))


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
             std: Sequence[float] = CIFAR_STD) -> nn.Module:
    """CIFAR ResNet-20, option-A shortcuts: 0.27 M parameters."""
    return CifarResNet((16, 32, 64), (3, 3, 3), _pad_shortcut, num_classes, mean, std)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
             std: Sequence[float] = CIFAR_STD) -> nn.Module:
    """CIFAR ResNet-18, projection shortcuts: 11.2 M parameters."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), _projection_shortcut, num_classes, mean, std)
