"""FT-SAM (Zhu et al., ICCV 2023): fine-tune the FP model with sharpness-aware minimisation; then
round-to-nearest.

SAM (Foret et al. 2021) takes each step with the gradient at the worst nearby weights: e = rho * g / ||g||
(g the gradient at w over all the model's weights), g' = the gradient at w + e, w <- w - lr * g'. Zhu et
al. show that this shrinks the norms of backdoor-related neurons during fine-tuning. Written into the shared
loop (`training.fit`): the loss climbs to w + e and returns the loss there, the optimizer steps from there
and the step hook takes e back off (weight decay therefore reads w + e, a difference of lr * decay * e).
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
class FtSamOptions(FineTuneOptions):
    """The fine-tuning schedule and SAM's neighbourhood radius `rho` (L2, over all weights)."""

    rho: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("rho", self.rho, low=0, low_open=True)


def run_ft_sam(ctx: DefenseContext, options: FtSamOptions):
    share = labelled_data(ctx, options)
    params = list(ctx.work.parameters())
    climbed: list[torch.Tensor] = []

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.augment(batch.x)
        grads = torch.autograd.grad(F.cross_entropy(model(x), batch.y), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            climbed[:] = [g * (options.rho / (norm + 1e-12)) for g in grads]
            for param, step in zip(params, climbed):
                param.add_(step)
        return F.cross_entropy(model(x), batch.y)

    def step_back() -> None:
        with torch.no_grad():
            for param, step in zip(params, climbed):
                param.sub_(step)

    record = fine_tune_(ctx.work, share, options.train_config(ctx.seed), ctx, name="fine-tune (SAM)",
                        loss_fn=loss_fn, after_step=step_back)
    requantize_(ctx)
    return [record], []


DEFENSES.register("ft-sam")(Defense("ft-sam", FtSamOptions, run_ft_sam,
                                    "FT-SAM: sharpness-aware fine-tuning of the FP model, then round-to-nearest"))
