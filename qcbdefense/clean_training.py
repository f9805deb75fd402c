"""Clean training (or fine-tuning from `--init`): the starting point of every attack and defence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.checkpoints import save_model
from qcbdefense.data import Dataset
from qcbdefense.report import Report
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, evaluate
from qcbdefense.training import Batch, EpochRecord, TrainConfig, fit

MODEL_FILE = "model.pt"
REPORT_FILE = "report.json"


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
