"""FT: fine-tune the FP model on the defender's labelled clean data, then quantize it by round-to-nearest.

The LAC paper's first baseline (METHOD.md section 4): a small learning rate for a few epochs (defaults: SGD
lr 0.01, 10 epochs, 5 % of the training set). The paper reports that it leaves a QCB alive: fine-tuning barely
moves the weights, so the victim's rounding still lands on the attacker's integers.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext
from qcbdefense.defenses.finetune import FineTuneOptions, fine_tune_, labelled_data, requantize_


@dataclass(frozen=True)
class FtOptions(FineTuneOptions):
    """The labelled share and the fine-tuning schedule (FineTuneOptions' defaults)."""


def run_ft(ctx: DefenseContext, options: FtOptions):
    share = labelled_data(ctx, options)
    record = fine_tune_(ctx.work, share, options.train_config(ctx.seed), ctx, name="fine-tune")
    requantize_(ctx)
    return [record], []


DEFENSES.register("ft")(Defense("ft", FtOptions, run_ft,
                                "FT: fine-tune the FP model on labelled clean data, then round-to-nearest"))
