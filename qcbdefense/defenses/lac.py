"""LAC (Li et al., ICML 2024): layer-wise activation correction, with and without PDA.

Per quantized layer, a continuous offset A shaped like the weight, initialised at zero, is added before
straight-through rounding on the layer's frozen grid:

    W_q = s * (clamp(round_ste((W + A) / s) + z, qmin, qmax) - z)

so A can move a weight by any number of quantization steps (AdaRound only picks floor or ceil). The loss is
the reconstruction error alone (no rounding regulariser); when a layer is done its weights are hardened to
the learned integers. `lac-pda` first perturbs each layer's cached inputs with PDA (pda.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from brevitas.function.ops_ste import round_ste
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.pda import PDAOptions, approximate_distribution
from qcbdefense.defenses.reconstruct import ReconOptions, Rounding, WeightGrid, reconstruct_


class OffsetRounding(Rounding):
    """LAC's parametrisation: the learned offset A (zero at the start: round-to-nearest)."""

    hard_forward = True

    def __init__(self, weight: torch.Tensor, grid: WeightGrid) -> None:
        super().__init__(weight, grid)
        self.offset = nn.Parameter(torch.zeros_like(self.w))

    def _integers(self, rounder) -> torch.Tensor:
        q = self.grid.clamp(rounder(self.grid.real_to_int(self.w + self.offset)))
        return self._pin(q)

    def forward(self) -> torch.Tensor:
        return self.grid.dequantize(self._integers(round_ste))

    @torch.no_grad()
    def integers(self) -> torch.Tensor:
        return self._integers(torch.round)


@dataclass(frozen=True)
class LacOptions(ReconOptions):
    """LAC's schedule (ReconOptions). Released: steps=10000 with early_stop=False."""


@dataclass(frozen=True)
class LacPdaOptions(PDAOptions, ReconOptions):
    """LAC's schedule plus PDA's (pda_steps, pda_step_size, pda_radius, pda_decay_at, pda_chunk)."""

    def __post_init__(self) -> None:
        ReconOptions.__post_init__(self)
        PDAOptions.__post_init__(self)


def run_lac(ctx: DefenseContext, options: ReconOptions):
    perturb = None
    if isinstance(options, PDAOptions):
        perturb = partial(_pda, options=options)
    return reconstruct_(ctx.fp_model, ctx.qmodel, ctx.images, OffsetRounding, options, perturb=perturb,
                        seed=ctx.seed, progress=ctx.progress)


def _pda(x, layer, bn, *, options: PDAOptions):
    return approximate_distribution(x, layer, bn, options)


DEFENSES.register("lac")(Defense("lac", LacOptions, run_lac,
                                 "LAC: layer-wise activation correction (learned integer offsets)"))
DEFENSES.register("lac-pda")(Defense("lac-pda", LacPdaOptions, run_lac,
                                     "LAC with PDA (inputs steered to the FP model's BN statistics)"))
