"""Input normalisation as the model's first module, so every model takes pixels in [0, 1].

Triggers are applied in pixel space, the ONNX file takes pixels, and nobody can forget to normalise.
The statistics are persistent buffers: they travel in the state_dict with the weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CIFAR_MEAN = (0.485, 0.456, 0.406)  # the statistics the shared ResNet-20 was trained with
CIFAR_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Normalized(nn.Module):
    """An outside model (torchvision, timm, the user's own, an ONNX file expecting normalised input) behind
    Normalize, so it takes pixels in [0, 1] like the zoo. Keys: `normalize.mean/std` and `net.*`."""

    def __init__(self, net: nn.Module, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
