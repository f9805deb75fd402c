"""Fine-pruning (Liu et al., RAID 2018): prune the last conv stage's channels that stay dormant on clean data,
then fine-tune; the victim quantizes the result by round-to-nearest.

The channels are those the classifier (the last nn.Linear) reads: in the zoo's models, the pooled output
of the last conv stage (after its residual add, as BackdoorBench masks a ResNet's last stage). Pruning a
channel zeroes its column of the classifier's weight, so the architecture, checkpoints and ONNX export stay
as they are, and the column is held at zero while fine-tuning. Channels go in increasing order of their mean
activation on the labelled clean share, as many as keep that share's accuracy within `max_accuracy_drop`
points of the unpruned model's (Liu et al. prune until clean accuracy starts to fall); since only the
classifier changes, every candidate count is scored on the features computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.data import Dataset, batches
from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext, StageRecord
from qcbdefense.defenses.finetune import FineTuneOptions, fine_tune_, labelled_data, requantize_
from qcbdefense.errors import InputError, check_number


@dataclass(frozen=True)
class FinePruningOptions(FineTuneOptions):
    """How far pruning may lower the labelled share's accuracy (points), then the fine-tuning schedule."""

    max_accuracy_drop: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("max_accuracy_drop", self.max_accuracy_drop, low=0, high=100, kind="accuracy points")


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last nn.Linear (its classifier, `models.reference.classifier_name`), by registration order."""
    from models.reference import classifier_name

    name = classifier_name(model)
    if name is None:
        raise InputError("fine-pruning prunes the channels the classifier reads: the model has no nn.Linear")
    return name, model.get_submodule(name)


@torch.no_grad()
def classifier_inputs(model: nn.Module, head: nn.Linear, share: Dataset, device: torch.device) -> torch.Tensor:
    """The classifier's input features [N, D] on the labelled share (model in eval mode)."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().flatten(1)))
    try:
        model.eval()
        for x, _ in batches(share.train_x, share.train_y, batch_size=256, device=device):
            model(x)
    finally:
        hook.remove()
    return torch.cat(captured)


def pruning_order(features: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                  max_accuracy_drop: float) -> tuple[torch.Tensor, list[float]]:
    """The channels to prune (least active first) and the labelled accuracy (%) after pruning 0, 1, ... of
    them; the count is the largest one whose accuracy stays within `max_accuracy_drop` of the unpruned one."""
    order = features.mean(0).argsort()
    logits = features @ head.weight.T + (head.bias if head.bias is not None else 0.0)
    accuracies = [100.0 * (logits.argmax(1) == labels).float().mean().item()]
    for channel in order.tolist():  # remove one channel's contribution at a time
        logits = logits - features[:, channel:channel + 1] * head.weight[:, channel]
        accuracies.append(100.0 * (logits.argmax(1) == labels).float().mean().item())
    count = 0
    for k, accuracy in enumerate(accuracies[1:], start=1):  # stop where accuracy first falls too far
        if accuracy < accuracies[0] - max_accuracy_drop:
            break
        count = k
    return order[:count], accuracies


def run_fine_pruning(ctx: DefenseContext, options: FinePruningOptions):
    share = labelled_data(ctx, options)
    name, head = classifier(ctx.work)
    features = classifier_inputs(ctx.work, head, share, ctx.device)
    labels = share.train_y.to(features.device)
    with torch.no_grad():
        pruned, accuracies = pruning_order(features, head, labels, options.max_accuracy_drop)
        head.weight[:, pruned] = 0.0

    def keep_pruned() -> None:
        with torch.no_grad():
            head.weight[:, pruned] = 0.0

    prune = StageRecord("prune", 0, 0.0, {"layer": name, "pruned_channels": len(pruned),
                                          "channels": head.in_features,
                                          "labelled_accuracy_before": accuracies[0],
                                          "labelled_accuracy_pruned": accuracies[len(pruned)]})
    tune = fine_tune_(ctx.work, share, options.train_config(ctx.seed), ctx, name="fine-tune", after_step=keep_pruned)
    requantize_(ctx)
    return [prune, tune], []


DEFENSES.register("fine-pruning")(Defense(
    "fine-pruning", FinePruningOptions, run_fine_pruning,
    "fine-pruning: prune the last stage's dormant channels, fine-tune, then round-to-nearest"))
