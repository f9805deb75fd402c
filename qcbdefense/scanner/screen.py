"""Which classes the scan searches fully: all of a small model's, a screened few of a model with many classes.

The searches cost one batch of images per class per step, so a scan of a 43-class model cost four times a
10-class one. A planted target stands out early: its trigger flips more of its batch than any other class's
from the first steps (and then needs a smaller patch, or a weaker whole-image perturbation), and clean images
that quantization moves pile onto it. So the screen runs every class through the first steps of the patch
and whole-image searches (a tenth of their steps when it was set), keeps in each family the classes whose
trigger did best (the smallest effort that succeeded, else the largest share of the batch flipped) and the
class the disagreements pile onto, and adds classes drawn at random (seeded) until `searched` are chosen: the
full searches then run on those alone, and the anomaly index (`verdict.search_signals`) measures each searched
class against the other searched ones, a population as large as a 10-class model's whatever the class count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from qcbdefense.scanner.drift import Disagreement
from qcbdefense.scanner.trigger_search import SearchConfig, search_triggers
from qcbdefense.scanner.whole_image_search import FAMILIES, WholeImageConfig, search_whole_image


@dataclass(frozen=True)
class ScreenConfig:
    """Settings of the screen (recorded in the scan report)."""

    searched: int = 10  # classes searched fully; a model with at most this many has all searched, no screen
    patch_steps: int = 14  # the screen runs the patch search on every class for this many steps ...
    whole_image_steps: int = 3  # ... and the whole-image searches for this many
    per_family: int = 2  # per trigger family, the classes whose trigger did best in the screen kept


@dataclass
class Screen:
    """The classes chosen for the full searches, and per family each class's screened (effort, rate): the
    smallest effort that succeeded (pixels of the patch, share of the largest budget of a whole-image family;
    all of it when none did) and the largest share of the batch flipped; None when there was no screen."""

    classes: list[int]
    efforts: dict[str, list[tuple[float, float]]] | None


def screen_classes(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor, num_classes: int,
                   disagree: Disagreement, *, config: ScreenConfig, search: SearchConfig,
                   whole_image: WholeImageConfig, min_disagreements: int, seed: int = 0,
                   progress: bool = False) -> Screen:
    """Choose the classes to search fully (`config`); `search` and `whole_image` are the full searches'
    settings, run here for `config`'s few steps; the pile class of `disagree` counts when it holds at
    least `min_disagreements`."""
    if num_classes <= config.searched:
        return Screen(list(range(num_classes)), None)

    patches = search_triggers(fp, quantized, x, fp_preds, num_classes, replace(search, steps=config.patch_steps),
                              seed=seed, progress=progress)
    wide = search_whole_image(fp, quantized, x, fp_preds, num_classes,
                              replace(whole_image, steps=config.whole_image_steps), search, seed=seed,
                              progress=progress)
    efforts = {"patch": [(c.area, c.rate) for c in patches],
               **{f: [(find.effort, find.rate) for find in wide[f]] for f in FAMILIES}}
    chosen = {disagree.pile_class} if sum(disagree.counts) >= min_disagreements else set()
    for values in efforts.values():
        chosen.update(sorted(range(num_classes), key=lambda c: (values[c][0], -values[c][1], c))[:config.per_family])
    others = [c for c in torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
              if c not in chosen]
    chosen.update(others[:max(config.searched - len(chosen), 0)])
    return Screen(sorted(chosen), efforts)
