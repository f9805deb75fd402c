"""I-BAU (Zeng et al., ICLR 2022): min-max unlearning of the FP model; then round-to-nearest.

The inner problem finds a universal perturbation d (one [C, H, W] pattern for a whole batch, inside an L2
ball of radius `radius` in pixel space) that maximises the model's cross-entropy on clean labelled images
(`inner_steps` Adam steps of size `inner_lr`, projected on the ball); the outer step trains the model to
classify the perturbed images correctly. I-BAU differentiates the outer loss through the inner solution
with an implicit hypergradient (a fixed-point approximation of the inverse Hessian product); this is the
first-order approximation that keeps d fixed during the outer step (the implicit term dropped), with a
fresh d for every batch. Defaults follow the paper's CIFAR setting: 5 inner steps, radius 10 in the
authors' normalised input space, about 2.5 in [0, 1] pixels (CIFAR's std is about 0.25).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.finetune import FineTuneOptions, fine_tune_, labelled_data, requantize_
from qcbdefense.errors import check_number
from qcbdefense.training import Batch


@dataclass(frozen=True)
class IBauOptions(FineTuneOptions):
    """The outer schedule (FineTuneOptions, 5 epochs) and the inner perturbation search."""

    epochs: int = 5
    inner_steps: int = 5
    inner_lr: float = 0.1
    radius: float = 2.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("inner_steps", self.inner_steps, integer=True, low=1)
        for key in ("inner_lr", "radius"):
            check_number(key, getattr(self, key), low=0, low_open=True)


def universal_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, options: IBauOptions) -> torch.Tensor:
    """One pattern [C, H, W] within the L2 ball that raises the model's cross-entropy on the whole batch
    (the model in eval mode meanwhile, so its BN statistics are not moved by the search)."""
    training = model.training
    model.eval()
    delta = torch.zeros_like(x[0], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=options.inner_lr)
    for _ in range(options.inner_steps):
        loss = -F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[delta])
        optimizer.step()
        with torch.no_grad():
            delta.mul_((options.radius / delta.norm().clamp_min(1e-12)).clamp(max=1.0))
    model.train(training)
    return delta.detach()


def run_ibau(ctx: DefenseContext, options: IBauOptions):
    share = labelled_data(ctx, options)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.augment(batch.x)
        delta = universal_perturbation(model, x, batch.y, options)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), batch.y)

    record = fine_tune_(ctx.work, share, options.train_config(ctx.seed), ctx, name="unlearn", loss_fn=loss_fn)
    requantize_(ctx)
    return [record], []


DEFENSES.register("i-bau")(Defense("i-bau", IBauOptions, run_ibau,
                                   "I-BAU (first-order): unlearn a universal adversarial perturbation, then "
                                   "round-to-nearest"))
