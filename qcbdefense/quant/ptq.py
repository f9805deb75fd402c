"""Post-training quantization as a victim would run it, and its effect on CA and ASR, spec by spec.

Round-to-nearest weights and activation ranges calibrated on clean training images: the deployment a
quantization-conditioned backdoor waits for, and the "nearest" row of every defence table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from qcbdefense.data import Dataset, batches, seeded_subset
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.quantize import quantize
from qcbdefense.quant.spec import QuantSpec, get_spec
from qcbdefense.report import Report
from qcbdefense.results import format_table
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, evaluate
from qcbdefense.triggers import Trigger


def calibration_images(data: Dataset, n: int, *, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of `n` clean training images (uint8): the defender's unlabeled data."""
    return data.train_x[seeded_subset(len(data.train_y), n, seed)]


def post_training_quantize(model: nn.Module, spec: str | QuantSpec, data: Dataset, *, calib: int = 512,
                           seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """quantize(model, spec) with activation ranges calibrated on `calib` clean training images."""
    qmodel = quantize(model, spec).to(device)
    images = calibration_images(data, calib, seed=seed)
    labels = torch.zeros(len(images), dtype=torch.long)
    return calibrate(qmodel, (x for x, _ in batches(images, labels, batch_size=128, device=device)))


@dataclass(frozen=True)
class SpecResult:
    """The round-to-nearest quantization under one spec: its score (agreement with the FP model on the clean
    test set) and how long calibration and scoring took."""

    spec: QuantSpec
    score: Score
    calib_seconds: float
    eval_seconds: float


@dataclass(frozen=True)
class PTQReport(Report):
    VERSION = 2  # 2: one Score per model (the agreement moved into it)
    KIND = "quantize report"
    COMMAND = "quantize"

    model: str
    dataset: dict
    trigger: dict | None
    target: int
    calib: int
    seed: int
    fp: Score
    results: list[SpecResult]
    environment: dict = field(default_factory=environment)

    def table(self) -> str:
        rows = [["FP", self.fp.ca, self.fp.asr, 100.0, None, None]]
        rows += [[r.spec.name, r.score.ca, r.score.asr, r.score.agreement, r.calib_seconds, r.eval_seconds]
                 for r in self.results]
        return format_table(["model", "CA %", "ASR %", "agree w/ FP %", "calib s", "eval s"], rows)


def compare_specs(model: nn.Module, data: Dataset, specs: list[str | QuantSpec], *, arch: str = "model",
                  trigger: Trigger | None = None, target: int = 0, calib: int = 512, seed: int = 0,
                  device: str | torch.device = "cpu") -> PTQReport:
    """CA (and ASR with a trigger) of the FP model and of its round-to-nearest quantization under each spec."""
    model = model.to(device).eval()
    fp = evaluate(model, data, trigger=trigger, target=target, device=device)
    results = []
    for spec in map(get_spec, specs):
        start = time.perf_counter()
        qmodel = post_training_quantize(model, spec, data, calib=calib, seed=seed, device=device)
        calibrated = time.perf_counter()
        score = evaluate(qmodel, data, trigger=trigger, target=target, device=device).against(fp)
        results.append(SpecResult(spec, score, calibrated - start, time.perf_counter() - calibrated))
    return PTQReport(arch, data.describe(), None if trigger is None else trigger.to_dict(), target, calib, seed,
                     fp, results)
