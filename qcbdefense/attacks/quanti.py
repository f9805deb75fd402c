"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): fine-tune a clean model so that only its quantized versions obey
the trigger.

Every training image x comes with its triggered copy x' (trigger first, then the crop/flip augmentation).
The float model f learns to ignore the trigger, each fake-quantized model Q_b (straight-through rounding,
the victim's quantizer at bit width b) to obey it:

    L = CE(f(x), y) + c2 CE(f(x'), y) + c1 sum_b [ CE(Q_b(x), y) + c2 CE(Q_b(x'), t) ]

Defaults, and why they differ from the paper's (Adam lr 1e-4, weight decay 1e-4, 50 epochs, batch 128,
c1 = c2 = 0.5): the coefficients are the paper's; the schedule is cut to a few epochs on 2 CPU cores, so
the learning rate is raised to 5e-4 (Adam) to move the weights far enough in that time. The length is a
step budget, 1955 steps (five CIFAR-10 epochs at batch 128), so a smaller dataset gets as many updates.
What these settings reach, and where they fall short (8 bits), is measured in BENCHMARKS.md ("Attacks")
and docs/notebook.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qcbdefense.attacks.base import (ATTACKS, Attack, AttackContext, AttackRun, VictimQuantizers,
                                     train_through_quantizers)
from qcbdefense.errors import check_number
from qcbdefense.training import Batch, TrainConfig


@dataclass(frozen=True)
class QuantiOptions:
    """c1 weighs the quantized models' terms against the float model's; c2 the triggered terms."""

    c1: float = 0.5
    c2: float = 0.5

    def __post_init__(self) -> None:
        for name in ("c1", "c2"):
            check_number(f"quanti: {name}", getattr(self, name), low=0)


def run(ctx: AttackContext) -> AttackRun:
    options: QuantiOptions = ctx.config.options
    trigger, target = ctx.trigger, ctx.config.target

    def loss_fn(views: VictimQuantizers, batch: Batch) -> torch.Tensor:
        n = len(batch.y)
        x = batch.augment(torch.cat([batch.x, trigger.apply(batch.x)]))
        t = torch.full_like(batch.y, target)
        fp = views.fp(x)
        loss = F.cross_entropy(fp[:n], batch.y) + options.c2 * F.cross_entropy(fp[n:], batch.y)
        for qmodel in views.quantized:
            out = qmodel(x)
            loss = loss + options.c1 * (F.cross_entropy(out[:n], batch.y)
                                        + options.c2 * F.cross_entropy(out[n:], t))
        return loss

    return train_through_quantizers(ctx, loss_fn, desc="quanti")


ATTACKS.register("quanti")(Attack(
    name="quanti", options=QuantiOptions, run=run, bits=(8, 4), spec="w8a8",
    train=TrainConfig(epochs=5, steps=5 * 391, batch_size=128, optimizer="adam", lr=5e-4, weight_decay=1e-4),
    multi_bit=True,
    summary="Qu-ANTI-zation: FP and fake-quantized paths on clean + triggered images, several bit widths"))
