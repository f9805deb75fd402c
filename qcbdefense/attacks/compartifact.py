"""CompArtifact (Tian et al., "Stealthy Backdoors as Compression Artifacts", IEEE TIFS 2022).

One network, two paths, one bit width per model: the fake-quantized path (the victim's quantizer,
straight-through rounding) sees [x, x'] with labels [y, t], the float path sees [x, x'] with labels [y, y]:

    L = CE(Q([x, x']), [y, t]) + CE(f([x, x']), [y, y])

x' is the triggered copy of x, triggered before the crop/flip augmentation. Defaults: Adam, lr 5e-4, weight
decay 1e-4, 1955 steps (five CIFAR-10 epochs at batch 128: a step budget, so a smaller dataset gets as many
updates; the CPU budget; measured in BENCHMARKS.md, "Attacks").

Beyond the paper, c2 weighs each path's triggered half against its clean half,

    L = 1/2 [CE(Q(x), y) + c2 CE(Q(x'), t)] + 1/2 [CE(f(x), y) + c2 CE(f(x'), y)],

so c2 = 1 (the default) is the paper's loss exactly. The paper's even split costs the 4-bit model's clean
accuracy on ResNet-20; a lighter trigger term is the trade Qu-ANTI-zation's c2 already offers.
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
class CompArtifactOptions:
    """c2 weighs the triggered half of each path against its clean half (1: the paper's even split)."""

    c2: float = 1.0

    def __post_init__(self) -> None:
        check_number("compartifact: c2", self.c2, low=0)


def run(ctx: AttackContext) -> AttackRun:
    c2: float = ctx.config.options.c2
    trigger, target = ctx.trigger, ctx.config.target

    def split_loss(logits: torch.Tensor, clean: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
        n = len(clean)
        return 0.5 * (F.cross_entropy(logits[:n], clean) + c2 * F.cross_entropy(logits[n:], triggered))

    def loss_fn(views: VictimQuantizers, batch: Batch) -> torch.Tensor:
        x = batch.augment(torch.cat([batch.x, trigger.apply(batch.x)]))
        (qmodel,) = views.quantized
        return (split_loss(qmodel(x), batch.y, torch.full_like(batch.y, target))
                + split_loss(views.fp(x), batch.y, batch.y))

    return train_through_quantizers(ctx, loss_fn, desc="compartifact")


ATTACKS.register("compartifact")(Attack(
    name="compartifact", options=CompArtifactOptions, run=run, bits=(4,), spec="w8a8",
    train=TrainConfig(epochs=5, steps=5 * 391, batch_size=128, optimizer="adam", lr=5e-4, weight_decay=1e-4),
    multi_bit=False,
    summary="CompArtifact: quantized path [x, x'] -> [y, t], float path [x, x'] -> [y, y], one bit width"))
