"""What the FP-model defences share (FT, fine-pruning, NAD, I-BAU, FT-SAM): the defender's labelled share of
the training set, a fine-tuning run through the project's training loop (`training.fit`), and the victim's
round-to-nearest quantization of the defended FP model.

These defences come from the backdoor literature, not from quantization: they repair the FP model, which the
victim then quantizes as usual. So each one trains `ctx.work` (the private copy of the user's model that
`ctx.qmodel` shares its parameters and BN buffers with) and then `requantize_` refreshes the weight ranges and
re-calibrates the activation ranges of `ctx.qmodel` on the defender's unlabeled images, exactly what
`quant.ptq.post_training_quantize` does to a fresh model. Unlike LAC (1,024 unlabeled images), they need
labels: a seeded share of the training split, 5 % by default as in BackdoorBench, recorded in the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.data import Dataset
from qcbdefense.defenses.base import DefenseContext, StageRecord
from qcbdefense.errors import InputError
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.quantize import refresh_weight_ranges
from qcbdefense.training import Batch, LossFn, TrainConfig, fit


@dataclass(frozen=True)
class FineTuneOptions:
    """The labelled share and the fine-tuning schedule (SGD with nesterov momentum, cosine decay, crop and
    flip), the `training.TrainConfig` fields a defence may change."""

    labelled_fraction: float = 0.05
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True

    def __post_init__(self) -> None:
        fraction = self.labelled_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise InputError(f"labelled_fraction must be a share of the training set in (0, 1], got {fraction!r}")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lr", "momentum", "weight_decay"):  # YAML reads 1e-4 as a string: refused here, not in torch
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (key == "lr" and value == 0)):
                raise InputError(f"{key} must be a number {'>' if key == 'lr' else '>='} 0, got {value!r}")
        if not isinstance(self.augment, bool):
            raise InputError(f"augment must be true or false, got {self.augment!r}")

    def train_config(self, seed: int, **changes) -> TrainConfig:
        return TrainConfig(**{"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                              "momentum": self.momentum, "weight_decay": self.weight_decay, "augment": self.augment,
                              "seed": seed, **changes})


def labelled_share(data: Dataset, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random share of the training split with its labels (uint8 images, int64 labels)."""
    n = max(1, round(fraction * len(data.train_y)))
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return data.train_x[idx], data.train_y[idx]


def labelled_data(ctx: DefenseContext, options: FineTuneOptions) -> Dataset:
    """The defender's labelled share as a Dataset (its test split is the real one, used by nobody here);
    records its size in `ctx.data_used`."""
    if ctx.data is None or ctx.work is None:
        raise InputError("this defence fine-tunes the FP model: it needs purify's dataset and model copy")
    x, y = labelled_share(ctx.data, options.labelled_fraction, ctx.seed)
    ctx.data_used.update({"labelled_train_images": len(y), "labelled_fraction": options.labelled_fraction})
    return dataclasses.replace(ctx.data, train_x=x, train_y=y)


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.augment(batch.x)), batch.y)


def fine_tune_(model: nn.Module, share: Dataset, config: TrainConfig, ctx: DefenseContext, *, name: str,
               loss_fn: LossFn = cross_entropy, after_step: Callable[[], None] | None = None,
               params: Iterable[nn.Parameter] | None = None) -> StageRecord:
    """Train `model` in place on the labelled share with `training.fit`; the stage's record."""
    for param in model.parameters():
        param.requires_grad_(True)
    start = time.perf_counter()
    fit(model, share, config, loss_fn=loss_fn, evaluate_fn=lambda _: {}, device=ctx.device, params=params,
        after_step=after_step, desc=name)
    model.eval()
    steps = math.ceil(len(share.train_y) / config.batch_size) * config.epochs
    return StageRecord(name, steps, time.perf_counter() - start, {"epochs": config.epochs, "lr": config.lr})


@torch.no_grad()
def requantize_(ctx: DefenseContext, batch_size: int = 128) -> None:
    """The victim's round-to-nearest quantization of the defended FP model: weight ranges searched again on
    the new weights, activation ranges calibrated again on the defender's unlabeled images."""
    for param in ctx.work.parameters():
        param.requires_grad_(False)
    refresh_weight_ranges(ctx.qmodel)
    calibrate(ctx.qmodel, (ctx.images[i:i + batch_size] for i in range(0, len(ctx.images), batch_size)))
