"""Clean training: the BatchNorm statistics it leaves behind."""

import torch
from torch import nn

from qcbdefense.clean_training import has_slow_batchnorm, train
from qcbdefense.data import Dataset
from qcbdefense.training import TrainConfig


def _data(n: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return Dataset("random", ["a", "b"], x, y, x[:16], y[:16], (0.5,) * 3, (0.25,) * 3)


def _model(momentum: float) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _batch_statistics(model: nn.Sequential, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z = model[0](data.train_x.float() / 255)
    return z.mean((0, 2, 3)), z.transpose(0, 1).reshape(4, -1).var(1)


def test_training_recomputes_the_statistics_of_a_slow_momentum_batchnorm():
    data, model = _data(), _model(momentum=0.01)  # torchvision's MobileNetV3 / EfficientNet momentum
    assert has_slow_batchnorm(model)
    train(model, data, TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=1e-2, augment=False), arch="tiny")
    mean, var = _batch_statistics(model, data)
    bn = model[1]
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.01 and not model.training


def test_training_leaves_a_default_momentum_batchnorm_to_its_running_average():
    data, model = _data(), _model(momentum=0.1)
    assert not has_slow_batchnorm(model)
    train(model, data, TrainConfig(epochs=2, batch_size=16, optimizer="adam", lr=1e-2, augment=False), arch="tiny")
    mean, _ = _batch_statistics(model, data)
    assert not torch.allclose(model[1].running_mean, mean, atol=1e-3)  # an average over the steps, not recomputed
