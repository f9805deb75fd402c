"""Trigger-guided calibration (beyond the LAC release): show the reconstruction where the models part.

LAC matches the FP model's activations on clean images. A QCB whose quantized model still answers the
trigger through activation rounding alone (measured on Qu-ANTI-zation, BENCHMARKS.md) survives that: clean
images never carry the trigger, so nothing asks the purified model to ignore it. The scanner's differential
trigger search (`scan.trigger_search`) finds, for every class, a small patch that sends the round-to-nearest
model to that class while the FP model keeps its prediction; of the patches that carry over to held-out images
(the scanner's rule, `ScanConfig.min_success`), the smallest is the one the quantized model answers most
easily (a planted target when there is one). A stamped copy of every calibration image carries that patch, so
the reconstruction also sees where the two models part, and there the FP model's activations are what the
purified model must reproduce. No labels, no trigger and no verdict are needed: on a clean pair no patch
usually carries over, and then nothing is added.
(Spreading the copies over every class's patch, or by inverse area, purified less: BENCHMARKS.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.errors import InputError
from qcbdefense.scan.scan import ScanConfig
from qcbdefense.scan.trigger_search import ClassSearch, SearchConfig, search_triggers, stamp


@dataclass
class GuidedImages:
    """The calibration images followed by their stamped copies, and what the search found."""

    images: torch.Tensor
    found: list[ClassSearch]

    def to_dict(self) -> dict:
        """Per class: the patch's area (pixels) and held-out differential success %; the class whose patch was
        stamped (None when no patch carried over); the number of images reconstructed on."""
        return {"classes": [{"class": c.target, "area": c.area, "success": c.success, "found": c.found}
                            for c in self.found],
                "stamped": self.stamped, "images": len(self.images)}

    @property
    def stamped(self) -> int | None:
        carried = [c for c in self.found if c.found and c.success >= ScanConfig.min_success]
        return min(carried, key=lambda c: c.area).target if carried else None


def with_found_triggers(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, *, seed: int = 0,
                        config: SearchConfig = SearchConfig(), chunk: int = 256,
                        progress: bool = False) -> GuidedImages:
    """Search a differential patch per class between `fp_model` and the calibrated round-to-nearest
    `qmodel` on `images` (float [N, C, H, W] in [0, 1]), then append a copy of every image stamped with the
    smallest patch that carries over. Neither model is modified; without one the images come back alone."""
    with torch.no_grad():
        logits = torch.cat([fp_model(part) for part in images.split(chunk)])
    try:
        found = search_triggers(fp_model, qmodel, images, logits.argmax(1), logits.shape[1], config, seed=seed,
                                progress=progress)
    except ValueError as err:  # too few calibration images for a search batch in every class
        raise InputError(f"search_triggers: {err} (use more calibration images)") from None
    guided = GuidedImages(images, found)
    if guided.stamped is None:
        return guided
    patch = found[guided.stamped]
    copies = stamp(images, patch.mask.to(images.device), patch.pattern.to(images.device))
    return GuidedImages(torch.cat([images, copies]), found)
