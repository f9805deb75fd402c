"""PQBackdoor (Ma et al., "Quantization Backdoors to Deep Learning Commercial Frameworks", IEEE TDSC 2023).

No fake-quantized training (unless `stage1_qat`, below). Two stages:

1. An ordinary backdoor, trained in float: a share `poison_rate` of each batch is triggered and relabelled
   to the target. Its integer weights under the victim's quantizer are recorded.
2. Float fine-tuning on clean images plus their triggered copies *with their true labels* (the float model
   unlearns the trigger), and after every optimizer step each quantized weight is projected back into the
   rounding bin of its stage-1 integer. So that the grid itself cannot move, the elements that define the
   range statistics (each channel's, or the tensor's, minimum and maximum) are held at their stage-1 values
   and every other weight is kept between them. Only conv/linear weights train; BatchNorm (statistics and
   affine) and biases stay at their stage-1 values, since the deployed model keeps them in float.

The deployed model's integer weights are then exactly those of the stage-1 backdoor (checked at the end:
`checks["int_weights_unchanged_wB"]`) while the published float model is clean.

Which grids: the projection holds a grid fixed when its range is a function of the channel's (or tensor's)
min and max: symmetric abs-max weights (per channel or per tensor, /127 or /127.5) and asymmetric min/max
weights. An MSE-searched range (the LAC/EFRAP evaluation quantizer, `w8a8`) depends on every weight, so no
box around the weights keeps it: such specs are refused, and the default is the paper's own target, the
`pqbackdoor-*` presets (PyTorch's per-channel symmetric qint8, scale = absmax / 127.5). Several bit widths
at once intersect their bins. Activation ranges are not weights: the victim calibrates them on the final
float model, so they are not held (their effect is part of the reported figures).

Beyond the paper, `stage1_qat`: stage 1 trains through the victim's quantizers (straight-through rounding,
re-quantized as the victim would, as Qu-ANTI-zation and CompArtifact do) on the same poisoned batches, so the
integer weights that stage 2 keeps are those of a quantization-aware backdoor. Plain stage 1 leaves the
deployed model to round-to-nearest of a float model; at 4 bits that alone costs several points of clean
accuracy (docs/notebook.md), which the attacker, who knows the quantizer, need not pay. Straight-through gradients
through 4-bit weights and activations are several times the float ones, so it wants a smaller stage1_lr
(measured: 0.01 diverged on the test suite's small CNN, 0.002 trains it; 0.005 trains ResNet-20).

Defaults, and why: the paper poisons about 1.5 % of each batch over a full training; our stage 1 is a short
fine-tune of a clean model (2 epochs), so it poisons 10 % to plant the backdoor in that time. Stage 2 uses
Adam (sign-like steps reach the bin edges in a few steps) for 1173 steps (three CIFAR-10 epochs at batch 128,
a step budget so that a smaller dataset gets as many updates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.attacks.base import (ATTACKS, Attack, AttackContext, AttackRun, VictimQuantizers, set_frozen_bn,
                                     stage_dir, train_through_quantizers)
from qcbdefense.errors import InputError, check_number
from qcbdefense.quant.inspect import IntWeights, integer_weights
from qcbdefense.quant.quantize import quantize, quantized_layers
from qcbdefense.quant.spec import QuantSpec
from qcbdefense.training import STATE_FILE, Batch, TrainConfig, fit


@dataclass(frozen=True)
class PQBackdoorOptions:
    """poison_rate: share of each stage-1 batch triggered and relabelled; stage1_epochs, stage1_lr: the
    stage-1 fine-tune (SGD, momentum 0.9, weight decay 5e-4); bin_margin: fraction of a quantization
    step kept between a weight and its bin's edges, so float rounding cannot tip it over; stage1_qat: train
    stage 1 through the victim's quantizers instead of in float (see the module docstring)."""

    poison_rate: float = 0.1
    stage1_epochs: int = 2
    stage1_lr: float = 0.01
    bin_margin: float = 0.02
    stage1_qat: bool = False

    def __post_init__(self) -> None:
        check_number("pqbackdoor: poison_rate", self.poison_rate, low=0, high=1, low_open=True)
        check_number("pqbackdoor: stage1_epochs", self.stage1_epochs, integer=True, low=1)
        check_number("pqbackdoor: stage1_lr", self.stage1_lr, low=0, low_open=True)
        check_number("pqbackdoor: bin_margin", self.bin_margin, low=0, high=0.5, high_open=True)
        if not isinstance(self.stage1_qat, bool):
            raise InputError(f"pqbackdoor: stage1_qat must be true or false, got {self.stage1_qat!r}")


@dataclass
class WeightBox:
    """Where one layer's weight may move: elementwise [low, high]; `anchor` elements stay at `value`."""

    weight: nn.Parameter
    low: torch.Tensor
    high: torch.Tensor
    anchor: torch.Tensor
    value: torch.Tensor

    @torch.no_grad()
    def project_(self) -> None:
        w = self.weight
        w.copy_(torch.where(self.anchor, self.value, torch.minimum(torch.maximum(w, self.low), self.high)))


def check_projectable(spec: QuantSpec) -> None:
    """InputError unless the weight grid of `spec` is fixed by each channel's (tensor's) min and max."""
    if spec.weight_scale == "mse":
        raise InputError(f"pqbackdoor cannot hold the weight grid of spec {spec.name!r} fixed: its range is "
                         f"an MSE search over all the weights; use an abs-max or min/max spec such as "
                         f"pqbackdoor-w8a8 (the default)")
    if spec.fold_bn:
        raise InputError(f"pqbackdoor cannot target spec {spec.name!r}: with BN folded the quantized weights "
                         f"depend on BN, which stage 2 leaves to the float model")


def weight_boxes(model: nn.Module, specs: tuple[QuantSpec, ...], margin: float
                 ) -> tuple[list[WeightBox], dict[str, dict[str, IntWeights]]]:
    """Boxes that keep every quantized weight of `model` on its current integer under every spec (bins
    intersected), and the integer weights they keep, per spec name."""
    boxes: dict[int, WeightBox] = {}
    recorded: dict[str, dict[str, IntWeights]] = {}
    for spec in specs:
        check_projectable(spec)
        qmodel = quantize(model, spec)
        ints = integer_weights(qmodel)
        recorded[spec.name] = ints
        for name, layer in quantized_layers(qmodel):
            w, iw = layer.weight.detach(), ints[name]
            q, s, z = iw.int_weight.to(w.dtype), iw.scale, iw.zero_point
            low = torch.where(q <= iw.qmin, -torch.inf, (q - z - 0.5 + margin) * s)
            high = torch.where(q >= iw.qmax, torch.inf, (q - z + 0.5 - margin) * s)
            dims = tuple(range(1, w.dim())) if spec.weight_per_channel else tuple(range(w.dim()))
            w_min, w_max = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
            low, high = torch.maximum(low, w_min), torch.minimum(high, w_max)
            anchor = (w == w_min) | (w == w_max)
            box = boxes.get(id(layer.weight))
            if box is None:
                boxes[id(layer.weight)] = WeightBox(layer.weight, low, high, anchor, w.clone())
            else:
                box.low, box.high = torch.maximum(box.low, low), torch.minimum(box.high, high)
                box.anchor = box.anchor | anchor
    return list(boxes.values()), recorded


def unchanged_share(model: nn.Module, spec: QuantSpec, recorded: dict[str, IntWeights]) -> float:
    """Share of the quantized weights whose integer (and grid) under `spec` is the recorded one."""
    now = integer_weights(quantize(model, spec))
    same = total = 0
    for name, before in recorded.items():
        after = now[name]
        grid = torch.equal(after.scale, before.scale) and torch.equal(after.zero_point, before.zero_point)
        same += int((after.int_weight == before.int_weight).sum()) if grid else 0
        total += before.int_weight.numel()
    return same / max(total, 1)


def run(ctx: AttackContext) -> AttackRun:
    options: PQBackdoorOptions = ctx.config.options
    cfg, model, trigger, target = ctx.config, ctx.model, ctx.trigger, ctx.config.target
    for spec in cfg.specs:
        check_projectable(spec)

    def poisoned(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        k = round(options.poison_rate * len(batch.y))  # batches are shuffled: the first k are a random draw
        x = torch.cat([trigger.apply(batch.x[:k]), batch.x[k:]])
        y = torch.cat([torch.full_like(batch.y[:k], target), batch.y[k:]])
        return batch.augment(x), y

    def poisoned_loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = poisoned(batch)
        return F.cross_entropy(m(x), y)

    def poisoned_quantized_loss(views: VictimQuantizers, batch: Batch) -> torch.Tensor:
        x, y = poisoned(batch)
        return sum(F.cross_entropy(qmodel(x), y) for qmodel in views.quantized)

    # Stage 1 is ordinary training (through the victim's quantizers with stage1_qat): SGD with momentum 0.9
    # and weight decay 5e-4; batch, subset, augmentation and seed follow the main config.
    stage1 = cfg.train.updated(epochs=options.stage1_epochs, optimizer="sgd", lr=options.stage1_lr,
                                 momentum=0.9, weight_decay=5e-4, warmup_epochs=0.0)
    if options.stage1_qat:
        run1 = train_through_quantizers(ctx, poisoned_quantized_loss, desc="pq stage 1", train=stage1,
                                        stage="stage1")
        history1, checks = run1.history["stage1"], run1.checks
    else:
        history1 = fit(model, ctx.data, stage1, loss_fn=poisoned_loss, evaluate_fn=ctx.monitor(),
                       out_dir=stage_dir(ctx, "stage1"), resume=ctx.resume, device=ctx.device, desc="pq stage 1")
        checks = {}

    model.eval()
    boxes, recorded = weight_boxes(model, cfg.specs, options.bin_margin)
    weights = [box.weight for box in boxes]
    trainable = {id(w) for w in weights}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]

    def project() -> None:
        for box in boxes:
            box.project_()

    def unlearn_loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch.augment(torch.cat([batch.x, trigger.apply(batch.x)]))
        return F.cross_entropy(m(x), torch.cat([batch.y, batch.y]))

    out2 = stage_dir(ctx, "stage2")
    resume2 = ctx.resume and out2 is not None and (out2 / STATE_FILE).is_file()
    if not resume2:
        project()
    for p in frozen:  # BN affine and biases stay at stage 1: the deployed model keeps them in float
        p.requires_grad_(False)
    try:
        history2 = fit(model, ctx.data, cfg.train, loss_fn=unlearn_loss, evaluate_fn=ctx.monitor(),
                       out_dir=out2, resume=resume2, device=ctx.device, params=weights, after_step=project,
                       before_epoch=lambda epoch: set_frozen_bn(model), desc="pq stage 2")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    checks.update({f"int_weights_unchanged_w{bits}": unchanged_share(model, spec, recorded[spec.name])
                   for bits, spec in zip(cfg.bits, cfg.specs)})
    return AttackRun({"stage1": history1, "stage2": history2}, checks)


ATTACKS.register("pqbackdoor")(Attack(
    name="pqbackdoor", options=PQBackdoorOptions, run=run, bits=(8,), spec="pqbackdoor-w8a8",
    train=TrainConfig(epochs=3, steps=3 * 391, batch_size=128, optimizer="adam", lr=1e-4, weight_decay=0.0),
    multi_bit=True,
    summary="PQBackdoor: FP backdoor, then FP unlearning projected into the backdoor's rounding bins"))
