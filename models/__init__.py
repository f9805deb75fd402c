"""The model zoo: CIFAR-sized architectures by name. Every model takes pixels in [0, 1] (see Normalize)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from models import mobilenet as _mobilenet  # noqa: F401  (each import registers its architectures)
from models import resnet_cifar as _resnet_cifar  # noqa: F401
from models import small_cnn as _small_cnn  # noqa: F401
from models import vgg as _vgg  # noqa: F401
from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalize
from models.registry import MODELS


def create_model(name: str, *, num_classes: int = 10, mean: Sequence[float] = CIFAR_MEAN,
                 std: Sequence[float] = CIFAR_STD) -> nn.Module:
    """Build a fresh model of the named architecture (InputError for an unknown name)."""
    model = MODELS.get(name)(num_classes=num_classes, mean=mean, std=std)
    model.qcb_model_ref = name  # the reference purified folders record (models.reference)
    return model


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["create_model", "list_models", "Normalize", "MODELS"]
