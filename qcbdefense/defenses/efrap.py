"""EFRAP (Li et al., "Nearest is Not Dearest", CVPR 2024): learned rounding that flips truncation errors.

AdaRound-style rounding variables V with h(V) = sigmoid(V), initialised so that h equals the fractional part
of W / s + z; the weight is s * (clamp(floor(W / s + z) + h, qmin, qmax) - z) while learning and rounds h at
0.5 when hardened. Loss (METHOD.md section 4):

    reconstruction + round_weight * sum(1 - |2h - 1|^2) + flip_weight * sum(|W - Q_nearest(W)| * BCE(h, 1 - r))

with r in {0, 1} the round-to-nearest choice (1: rounded up): every weight is pushed to flip its rounding,
weighted by its truncation error, while the reconstruction term protects accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.reconstruct import ReconOptions, Rounding, WeightGrid, reconstruct_
from qcbdefense.errors import check_number

_FRACTION_EPS = 1e-4  # keeps the logit of a fractional part of exactly 0 or 1 finite


class FlipRounding(Rounding):
    """EFRAP's parametrisation: h = sigmoid(V) on top of the floor; penalty as in the module docstring."""

    def __init__(self, weight: torch.Tensor, grid: WeightGrid, *, round_weight: float = 0.01,
                 flip_weight: float = 1.0) -> None:
        super().__init__(weight, grid)
        self.round_weight, self.flip_weight = round_weight, flip_weight
        real = grid.real_to_int(self.w)
        self.register_buffer("floor", torch.floor(real))
        fraction = (real - self.floor).clamp(_FRACTION_EPS, 1 - _FRACTION_EPS)
        self.v = nn.Parameter(torch.logit(fraction))
        rounded_up = (torch.round(real) > self.floor).to(self.w.dtype)
        self.register_buffer("flip_target", 1.0 - rounded_up)
        self.register_buffer("truncation", (self.w - grid.dequantize(self.q_nearest)).abs())

    def h(self) -> torch.Tensor:
        return torch.sigmoid(self.v)

    def forward(self) -> torch.Tensor:
        return self.grid.dequantize(self._pin(self.grid.clamp(self.floor + self.h())))

    @torch.no_grad()
    def integers(self) -> torch.Tensor:
        return self._pin(self.grid.clamp(self.floor + (self.h() >= 0.5).to(self.w.dtype)))

    def penalty(self, progress: float) -> torch.Tensor:
        h = self.h()
        rounding = (1 - (2 * h - 1).abs().pow(2)).sum()
        flip = (self.truncation * F.binary_cross_entropy(h, self.flip_target, reduction="none")).sum()
        return self.round_weight * rounding + self.flip_weight * flip


@dataclass(frozen=True)
class EfrapOptions(ReconOptions):
    """EFRAP's schedule (same as LAC's, but every step runs: its penalty drives h to 0 or 1) and weights."""

    early_stop: bool = False
    keep_best: bool = False
    round_weight: float = 0.01
    flip_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("round_weight", "flip_weight"):
            check_number(key, getattr(self, key), low=0)


def run_efrap(ctx: DefenseContext, options: EfrapOptions):
    def make(weight: torch.Tensor, grid: WeightGrid) -> FlipRounding:
        return FlipRounding(weight, grid, round_weight=options.round_weight, flip_weight=options.flip_weight)

    return reconstruct_(ctx.fp_model, ctx.qmodel, ctx.images, make, options, seed=ctx.seed,
                        progress=ctx.progress)


DEFENSES.register("efrap")(Defense("efrap", EfrapOptions, run_efrap,
                                   "EFRAP: learned rounding pushed to flip the nearest rounding"))
