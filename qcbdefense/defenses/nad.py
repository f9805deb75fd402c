"""NAD, neural attention distillation (Li et al., ICLR 2021), on the FP model; then round-to-nearest.

A copy of the model is fine-tuned on the labelled clean share as the teacher (`teacher_epochs`); the model is
then fine-tuned with cross-entropy plus, at each stage, beta times the squared distance between its attention
map and the teacher's: a(f) = the channel mean of |f|^power, flattened and L2-normalised (the paper's
attention). The stages are where the feature maps end at each spatial size (the module that finishes last
before the size changes: layer1..3 of a CIFAR ResNet, the last ReLU before each pooling of small_cnn); the
last `len(betas)` of them are used, betas in execution order (the paper's 500, 1000, 1000 for the last three
groups of its ResNets).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.finetune import FineTuneOptions, fine_tune_, labelled_data, requantize_
from qcbdefense.errors import InputError, check_number
from qcbdefense.training import Batch


@dataclass(frozen=True)
class NadOptions(FineTuneOptions):
    """The teacher's fine-tuning epochs, the student's (`epochs`), the attention weights and power."""

    epochs: int = 20
    teacher_epochs: int = 10
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    power: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("teacher_epochs", self.teacher_epochs, integer=True, low=1)
        betas = self.betas if isinstance(self.betas, (list, tuple)) else [self.betas]
        if not betas:
            raise InputError("betas must be one or more numbers >= 0, got none")
        for beta in betas:
            check_number("betas", beta, low=0, kind="numbers")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        check_number("power", self.power, low=0, low_open=True)


@torch.no_grad()
def attention_stages(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output ends a run of feature maps of one spatial size (larger than 1x1),
    in execution order."""
    finished: list[tuple[str, tuple[int, int]]] = []
    hooks = [module.register_forward_hook(
        lambda _m, _args, out, name=name: finished.append((name, tuple(out.shape[2:])))
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1 else None)
        for name, module in model.named_modules() if name]
    try:
        model.eval()
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return [name for i, (name, size) in enumerate(finished) if i + 1 == len(finished) or finished[i + 1][1] != size]


def attention(features: torch.Tensor, power: float) -> torch.Tensor:
    """NAD's attention map: channel mean of |f|^power, flattened, L2-normalised per image."""
    return F.normalize(features.abs().pow(power).mean(1).flatten(1), dim=1)


class _Captured:
    """Forward hooks keeping the outputs of the named modules of one model."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.hooks = [modules[name].register_forward_hook(
            lambda _m, _args, out, name=name: self.outputs.__setitem__(name, out)) for name in names]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def run_nad(ctx: DefenseContext, options: NadOptions):
    share = labelled_data(ctx, options)
    teacher = copy.deepcopy(ctx.work)
    teacher_record = fine_tune_(teacher, share, options.train_config(ctx.seed, epochs=options.teacher_epochs), ctx,
                                name="teacher")
    for param in teacher.parameters():
        param.requires_grad_(False)
    stages = attention_stages(ctx.work, ctx.images[:1])[-len(options.betas):]
    betas = options.betas[-len(stages):]
    student, taught = _Captured(ctx.work, stages), _Captured(teacher, stages)

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.augment(batch.x)
        loss = F.cross_entropy(model(x), batch.y)
        with torch.no_grad():
            teacher(x)
        for beta, name in zip(betas, stages):
            gap = attention(student.outputs[name], options.power) - attention(taught.outputs[name], options.power)
            loss = loss + beta * gap.pow(2).mean()
        return loss

    try:
        record = fine_tune_(ctx.work, share, options.train_config(ctx.seed), ctx, name="distil", loss_fn=loss_fn)
    finally:
        student.remove()
        taught.remove()
    record.details["stages"] = stages
    requantize_(ctx)
    return [teacher_record, record], []


DEFENSES.register("nad")(Defense("nad", NadOptions, run_nad,
                                 "NAD: attention distillation from a fine-tuned teacher, then round-to-nearest"))
