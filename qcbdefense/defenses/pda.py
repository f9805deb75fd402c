"""PDA, LAC's distribution approximation: nudge each layer's cached inputs towards the FP model's BN statistics.

Before a layer followed by BatchNorm is reconstructed, every cached input x gets a perturbation delta,
found by signed-gradient descent inside an L-infinity ball, so that each sample's per-channel mean and std
just before BN (the layer's output with its round-to-nearest weights) move towards that BN's running mean
and running std. The FP model's BN statistics were accumulated during the attacker's training, triggered
images included, so the perturbed inputs carry poison-like activations where quantization drifts most; the
reconstruction then matches, on these inputs, the FP outputs of the clean inputs (METHOD.md section 3).

Released settings: 500 steps, step size 1e-3 halved after step 250, radius 1e-3, each batch of 32 on its
own. Ours: 10 steps. The step size equals the radius, so the first signed step already puts every element of
delta on the ball's surface, and later steps can only zero or flip it; measured (BENCHMARKS.md), 10 steps
leave each layer's statistics distance where 50 do, to four decimals, at a fifth of the time. The loss is a
sum of per-sample terms, so the sign of its gradient for one sample does not depend on the others: perturbing
all cached images at once (in chunks, for memory) gives exactly the per-batch result, with a few large kernels
instead of many small ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from qcbdefense.errors import InputError


@dataclass(frozen=True)
class PDAOptions:
    """PDA's schedule: signed-gradient steps, step size (halved from step `decay_at` on), L-inf radius."""

    RELEASED: ClassVar[dict] = {"pda_steps": 500}  # `--released`

    pda_steps: int = 10
    pda_step_size: float = 1e-3
    pda_radius: float = 1e-3
    pda_decay_at: int = 250
    pda_chunk: int = 64  # images per perturbation batch: small enough for the cache (256 cost 8 % more CPU)

    def __post_init__(self) -> None:
        for key in ("pda_steps", "pda_chunk"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (key == "pda_chunk"
                                                                                      and value == 0):
                raise InputError(f"{key} must be a {'positive' if key == 'pda_chunk' else 'non-negative'} "
                                 f"integer, got {value!r}")
        for key in ("pda_step_size", "pda_radius"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(self.pda_decay_at, bool) or not isinstance(self.pda_decay_at, int):
            raise InputError(f"pda_decay_at must be an integer, got {self.pda_decay_at!r}")

    def pda_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k.startswith("pda_")}


def statistics_distance(pre_bn: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """Per sample, sum over channels of (mean_c - running_mean_c)^2 + (std_c - running_std_c)^2.

    `pre_bn` is [N, C, H, W]; the std is BN's (biased variance + eps, square-rooted), so a dead channel has a
    finite gradient. Returns [N].
    """
    dims = tuple(range(2, pre_bn.dim()))
    sample_mean = pre_bn.mean(dims)
    sample_std = (pre_bn.var(dims, unbiased=False) + eps).sqrt()
    return ((sample_mean - mean) ** 2 + (sample_std - std) ** 2).sum(1)


def approximate_distribution(x: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor], bn: nn.Module,
                             options: PDAOptions) -> tuple[torch.Tensor, tuple[float, float]]:
    """Perturbed copies of the cached inputs `x` [N, ...] (PDA), and the mean statistics distance per sample
    before and after.

    `layer` maps inputs to the pre-BN output (the quantized layer with its nearest weights); `bn` is the
    BatchNorm2d whose running statistics are the target.
    """
    mean = bn.running_mean.detach()
    std = (bn.running_var.detach() + bn.eps).sqrt()
    out, before, after = [], 0.0, 0.0
    for part in x.split(options.pda_chunk):
        delta = torch.zeros_like(part)
        if options.pda_steps == 0:
            with torch.no_grad():
                before += statistics_distance(layer(part), mean, std, bn.eps).sum().item()
        for step in range(options.pda_steps):
            size = options.pda_step_size if step < options.pda_decay_at else options.pda_step_size / 2
            delta.requires_grad_(True)
            loss = statistics_distance(layer(part + delta), mean, std, bn.eps).sum()
            if step == 0:  # delta is zero: the distance before the perturbation
                before += loss.item()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - size * grad.sign()).clamp_(-options.pda_radius, options.pda_radius)
        perturbed = (part + delta).detach()
        with torch.no_grad():
            after += statistics_distance(layer(perturbed), mean, std, bn.eps).sum().item()
        out.append(perturbed)
    return torch.cat(out), (before / len(x), after / len(x))
