"""Scores of the field: clean accuracy (CA), attack success rate (ASR) and robust accuracy (RA) on non-target
images, per-class accuracy, and the defence-effectiveness rating (DER) of a defence."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from qcbdefense.data import Dataset, batches
from qcbdefense.quant.held_view import fast_equivalent
from qcbdefense.report import saved_field
from qcbdefense.triggers import Trigger, non_target


@dataclass(frozen=True)
class Score:
    """How one model did, in % in [0, 100]: the one score of the toolkit (evaluate, PTQ, purify, verify, bench).

    `asr` and `ra` are None without a trigger. RA (robust accuracy, as BackdoorBench reports it): triggered
    non-target images still given their true class. `agreement`: argmax agreement with a reference model on the
    clean test images (None when not compared). `der`: the defence-effectiveness rating against the undefended
    round-to-nearest model (`defense_effectiveness_rating`; None when not a defended model or without a trigger).
    `predictions` (clean split, kept for agreement checks) is not part of the saved record.
    """

    ca: float
    asr: float | None = None
    ra: float | None = None
    agreement: float | None = None
    der: float | None = None
    per_class_accuracy: list[float] = field(default_factory=list)
    n_clean: int = 0
    n_poisoned: int = 0
    predictions: torch.Tensor | None = saved_field(default=None, repr=False, compare=False)

    def against(self, reference: "Score", undefended: "Score | None" = None) -> "Score":
        """This score with its agreement with `reference`'s predictions and, given the undefended model's score,
        its DER."""
        der = None
        if undefended is not None and undefended.asr is not None and self.asr is not None:
            der = defense_effectiveness_rating(undefended.ca, undefended.asr, self.ca, self.asr)
        return replace(self, agreement=agreement(self.predictions, reference.predictions), der=der)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500, device: str | torch.device = "cpu",
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Arg-max predictions (on CPU) of `model` for uint8 images `x`, optionally transformed (triggered) first,
    fed to the model as `dtype` (a float64 model: `dtype=torch.float64`). A float32 Brevitas model runs as its
    held-range view where that gives its logits bit for bit on the first 64 images
    (`quant.held_view.fast_equivalent`)."""
    model.eval()
    dummy = torch.zeros(len(x), dtype=torch.long)
    run, preds = None, []
    for xb, _ in batches(x, dummy, batch_size=batch_size, device=device, transform=transform):
        xb = xb.to(dtype)
        if run is None:  # a module's truth value is its length where it has one: test for None
            # enough images to check the arithmetic, few to repeat; the held view computes in float32 only
            run = fast_equivalent(model, xb[:64]) if dtype == torch.float32 else model
        preds.append(run(xb).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def triggered_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int, *,
                     device: str | torch.device = "cpu") -> tuple[float, float, int]:
    """ASR and RA (%) on the triggered images whose true class is not `target`, and how many there were.

    ASR: the share sent to `target`; RA: the share still given its true class.
    """
    xp, yp = non_target(x, y, target)
    if len(xp) == 0:
        return 0.0, 0.0, 0
    preds = predict(model, xp, device=device, transform=trigger.apply)
    return (100.0 * (preds == target).float().mean().item(), 100.0 * (preds == yp).float().mean().item(),
            len(xp))


def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int, *,
                        device: str | torch.device = "cpu") -> tuple[float, int]:
    """Share (%) of triggered images whose true class is not `target` that the model sends to `target`."""
    asr, _, n = triggered_scores(model, x, y, trigger, target, device=device)
    return asr, n


def defense_effectiveness_rating(undefended_ca: float, undefended_asr: float, defended_ca: float,
                                 defended_asr: float) -> float:
    """DER (%) of Zhu et al.: [max(0, dASR) - max(0, dCA) + 1] / 2, the drops measured from the undefended
    (round-to-nearest) model to the defended one, in percent. 100 is perfect; 50 means nothing changed."""
    d_asr = max(0.0, undefended_asr - defended_asr) / 100.0
    d_ca = max(0.0, undefended_ca - defended_ca) / 100.0
    return 100.0 * (d_asr - d_ca + 1.0) / 2.0


def evaluate(model: nn.Module, data: Dataset, *, trigger: Trigger | None = None, target: int = 0,
             device: str | torch.device = "cpu", split: str = "test") -> Score:
    """CA and per-class accuracy on the clean split; ASR too when a trigger is given."""
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    preds = predict(model, x, device=device)
    correct = (preds == y).float()
    per_class = [100.0 * correct[y == c].mean().item() if (y == c).any() else float("nan")
                 for c in range(data.num_classes)]
    asr, ra, n_poisoned = (None, None, 0) if trigger is None else triggered_scores(model, x, y, trigger, target,
                                                                                  device=device)
    return Score(ca=100.0 * correct.mean().item(), asr=asr, per_class_accuracy=per_class,
                   n_clean=len(y), n_poisoned=n_poisoned, ra=ra, predictions=preds)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Argmax agreement (%) of two prediction vectors."""
    return 100.0 * (a == b).float().mean().item()
