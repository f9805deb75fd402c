"""AdaRound (Nagel et al., ICML 2020): plain learned rounding, no anti-backdoor term.

Shows how much of a purifier's effect comes from better post-training quantization alone. Rounding
variables V with Brevitas's own rectified sigmoid (`LearnedRoundHardSigmoid`: h = clamp(sigmoid(V) * 1.2
- 0.1, 0, 1), the function of Brevitas's LEARNED_ROUND / HARD_SIGMOID quantizers), initialised at the
fractional part; loss = reconstruction + reg_weight * sum(1 - |2h - 1|^beta) with beta annealed from
beta_start to beta_end after a warm-up without regulariser (the AdaRound paper's schedule); hardened by
rounding h at 0.5.

Why not Brevitas's LEARNED_ROUND weight quantizer itself: it would replace every layer's weight quantizer
(new state_dict keys, the MSE range searched again), its training loop lives in brevitas_examples (which
matches blocks by child name and silently does nothing when none match), and it cannot share the loop,
frozen grid and exact hardening of LAC and EFRAP. The rounding function is Brevitas's; the loop is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from brevitas.core.function_wrapper.learned_round import LearnedRoundHardSigmoid
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.reconstruct import ReconOptions, Rounding, WeightGrid, reconstruct_
from qcbdefense.errors import check_number

_ZETA, _GAMMA = 1.1, -0.1   # LearnedRoundHardSigmoid's stretch: h = clamp(sigmoid(V) * (zeta - gamma) + gamma)


class LearnedRounding(Rounding):
    """AdaRound's parametrisation: floor + h(V), h Brevitas's rectified sigmoid."""

    def __init__(self, weight: torch.Tensor, grid: WeightGrid, *, reg_weight: float = 0.01,
                 beta_start: float = 20.0, beta_end: float = 2.0, warmup: float = 0.2) -> None:
        super().__init__(weight, grid)
        self.reg_weight, self.beta_start, self.beta_end, self.warmup = reg_weight, beta_start, beta_end, warmup
        real = grid.real_to_int(self.w)
        self.register_buffer("floor", torch.floor(real))
        fraction = real - self.floor
        stretched = ((fraction - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.logit(stretched))
        self.h_impl = LearnedRoundHardSigmoid(learned_round_zeta=_ZETA, learned_round_gamma=_GAMMA).train()

    def h(self) -> torch.Tensor:
        return self.h_impl(self.v)

    def forward(self) -> torch.Tensor:
        return self.grid.dequantize(self._pin(self.grid.clamp(self.floor + self.h())))

    @torch.no_grad()
    def integers(self) -> torch.Tensor:
        return self._pin(self.grid.clamp(self.floor + (self.h() >= 0.5).to(self.w.dtype)))

    def penalty(self, progress: float) -> torch.Tensor | None:
        if progress < self.warmup:
            return None
        ramp = (progress - self.warmup) / (1 - self.warmup)
        beta = self.beta_end + (self.beta_start - self.beta_end) * (1 - ramp)
        return self.reg_weight * (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class AdaRoundOptions(ReconOptions):
    """AdaRound's schedule (every step runs: beta is annealed over it) and regulariser."""

    early_stop: bool = False
    keep_best: bool = False
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("warmup", self.warmup, low=0, high=1, high_open=True, kind="a fraction")
        for key in ("reg_weight", "beta_start", "beta_end"):
            check_number(key, getattr(self, key), low=0)


def run_adaround(ctx: DefenseContext, options: AdaRoundOptions):
    def make(weight: torch.Tensor, grid: WeightGrid) -> LearnedRounding:
        return LearnedRounding(weight, grid, reg_weight=options.reg_weight, beta_start=options.beta_start,
                               beta_end=options.beta_end, warmup=options.warmup)

    return reconstruct_(ctx.fp_model, ctx.qmodel, ctx.images, make, options, seed=ctx.seed,
                        progress=ctx.progress)


DEFENSES.register("adaround")(Defense("adaround", AdaRoundOptions, run_adaround,
                                      "AdaRound: plain learned rounding (no anti-backdoor term)"))
