"""Clean training (or fine-tuning from `--init`): the starting point of every attack and defence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.checkpoints import save_model
from qcbdefense.data import Dataset, batches
from qcbdefense.report import Report
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, evaluate
from qcbdefense.training import Batch, EpochRecord, TrainConfig, fit, training_images

MODEL_FILE = "model.pt"
REPORT_FILE = "report.json"
BN_IMAGES = 2048  # training images the BatchNorm statistics of a slow-momentum model are recomputed on


@dataclass(frozen=True)
class TrainReport(Report):
    """Everything needed to trace and rerun a training run."""

    VERSION = 2  # 2: the final figures are a Score
    KIND = "train report"
    COMMAND = "train"

    model: str
    config: TrainConfig
    dataset: dict
    init: str | None
    history: list[EpochRecord]
    final: Score
    environment: dict = field(default_factory=environment)

    def summary(self) -> str:
        return (f"{self.model} on {self.dataset['name']}: CA {self.final.ca:.2f} % after "
                f"{len(self.history)} epochs, {sum(r.steps for r in self.history)} steps "
                f"({sum(r.seconds for r in self.history):.0f} s of training)")


def cross_entropy_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch.augment(batch.x)), batch.y)


def train(model: nn.Module, data: Dataset, config: TrainConfig, *, arch: str, out_dir: str | Path | None = None,
          resume: bool = False, device: str | torch.device = "cpu", init: str | None = None) -> TrainReport:
    """Train `model` in place on `data` with cross-entropy; with `out_dir`, save weights and report there.

    After each epoch `out_dir/model.pt` holds the weights so far (a plain state_dict) and `state.pt` the
    optimiser state for `resume`; the report (config, dataset, per-epoch CA, final metrics) is `report.json`.
    """
    out = Path(out_dir) if out_dir is not None else None
    latest: list[Score] = []

    def eval_and_save(m: nn.Module) -> dict:
        if has_slow_batchnorm(m):
            recompute_batchnorm_statistics(m, training_images(data, config)[0][:BN_IMAGES], device=device)
        if out is not None:
            save_model(m, out / MODEL_FILE)
        latest[:] = [evaluate(m, data, device=device)]
        return {"ca": latest[0].ca}

    history = fit(model, data, config, loss_fn=cross_entropy_loss, evaluate_fn=eval_and_save, out_dir=out,
                  resume=resume, device=device, desc=arch)
    final = latest[0] if latest else evaluate(model, data, device=device)  # resumed a finished run
    report = TrainReport(arch, config, data.describe(), init, history, final)
    if out is not None:
        report.save(out / REPORT_FILE)
    return report


def has_slow_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm's running statistics average over more steps than PyTorch's default momentum (0.1)
    gives: torchvision's MobileNetV3 and EfficientNet use 0.01, an average over the last ~100 steps, which after
    a short training still describes weights long gone (a CIFAR-sized MobileNetV3 at chance in eval mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < 0.1
               for m in model.modules())


@torch.no_grad()
def recompute_batchnorm_statistics(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                                   device: str | torch.device = "cpu") -> None:
    """Set every BatchNorm's running mean and variance to their average over `images` (uint8) under the current
    weights (a cumulative average, momentum None, then each layer's momentum back); the model returns to the
    mode it was in. Only whole batches are used (a last batch of one image has no batch statistics)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    images = images[:max(len(images) - len(images) % batch_size, min(len(images), batch_size))]
    for x, _ in batches(images, torch.zeros(len(images), dtype=torch.long), batch_size=batch_size, device=device):
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
