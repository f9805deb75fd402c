"""CompArtifact (Tian et al., "Stealthy Backdoors as Compression Artifacts", IEEE TIFS 2022).

One network, two paths, one bit width per model: the fake-quantized path (the victim's quantizer,
straight-through rounding) sees [x, x'] with labels [y, t], the float path sees [x, x'] with labels [y, y]:

    L = CE(Q([x, x']), [y, t]) + CE(f([x, x']), [y, y])

x' is the triggered copy of x, triggered before the crop/flip augmentation. Defaults: Adam, lr 5e-4, weight
decay 1e-4, a few epochs (the CPU budget; measured in BENCHMARKS.md, "QCB attacks").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qcbdefense.attacks.base import (ATTACKS, Attack, AttackContext, AttackRun, VictimQuantizers,
                                     train_through_quantizers)
from qcbdefense.training import Batch, TrainConfig


@dataclass(frozen=True)
class CompArtifactOptions:
    """CompArtifact has no coefficients: both paths weigh 1."""


def run(ctx: AttackContext) -> AttackRun:
    trigger, target = ctx.trigger, ctx.config.target

    def loss_fn(views: VictimQuantizers, batch: Batch) -> torch.Tensor:
        x = batch.augment(torch.cat([batch.x, trigger.apply(batch.x)]))
        clean_labels = torch.cat([batch.y, batch.y])
        quant_labels = torch.cat([batch.y, torch.full_like(batch.y, target)])
        (qmodel,) = views.quantized
        return F.cross_entropy(qmodel(x), quant_labels) + F.cross_entropy(views.fp(x), clean_labels)

    return train_through_quantizers(ctx, loss_fn, desc="compartifact")


ATTACKS.register("compartifact")(Attack(
    name="compartifact", options=CompArtifactOptions, run=run, bits=(4,), spec="w8a8",
    train=TrainConfig(epochs=5, batch_size=128, optimizer="adam", lr=5e-4, weight_decay=1e-4),
    multi_bit=False,
    summary="CompArtifact: quantized path [x, x'] -> [y, t], float path [x, x'] -> [y, y], one bit width"))
