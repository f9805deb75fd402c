"""No defence: round-to-nearest post-training quantization (`quant.ptq.post_training_quantize`).

`purify` always builds this model first (the "nearest" row of every report); this method returns it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext


@dataclass(frozen=True)
class NearestOptions:
    """Round-to-nearest takes no options."""


def run_nearest(ctx: DefenseContext, options: NearestOptions):
    return [], []


DEFENSES.register("nearest")(Defense("nearest", NearestOptions, run_nearest,
                                     "no defence: round-to-nearest PTQ with calibrated activations"))
