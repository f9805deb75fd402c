"""Trigger-guided calibration (beyond the LAC release): show the reconstruction where the models part.

LAC matches the FP model's activations on clean images. A QCB whose quantized model still answers the
trigger through activation rounding alone (measured on Qu-ANTI-zation, BENCHMARKS.md) survives that: clean
images never carry the trigger, so nothing asks the purified model to ignore it. The scanner's differential
trigger search (`scan.trigger_search`) finds, for every class, a small patch that sends the round-to-nearest
model to that class while the FP model keeps its prediction. Stamping copies of the calibration images with
those patches puts reconstruction targets exactly where the two models disagree, and there the FP model's
activations are what the purified model must reproduce. It needs no labels, no trigger and no verdict:
every class's patch is used, so a clean model only gains a few adversarial calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.scan.trigger_search import ClassSearch, SearchConfig, search_triggers, stamp


@dataclass
class GuidedImages:
    """The calibration images followed by their stamped copies, and what the search found."""

    images: torch.Tensor
    found: list[ClassSearch]

    def to_dict(self) -> dict:
        """Per class: the patch's area (pixels), its held-out differential success % and whether it was used."""
        return {"classes": [{"class": c.target, "area": c.area, "success": c.success, "used": c.found}
                            for c in self.found],
                "images": len(self.images)}


def with_found_triggers(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, *, seed: int = 0,
                        config: SearchConfig = SearchConfig(), chunk: int = 256,
                        progress: bool = False) -> GuidedImages:
    """Search a differential patch per class between `fp_model` and the calibrated round-to-nearest
    `qmodel` on `images` (float [N, C, H, W] in [0, 1]), then append one stamped copy of every image, the
    found patches taking turns. Neither model is modified; without any patch the images come back alone."""
    with torch.no_grad():
        logits = torch.cat([fp_model(part) for part in images.split(chunk)])
    found = search_triggers(fp_model, qmodel, images, logits.argmax(1), logits.shape[1], config, seed=seed,
                            progress=progress)
    used = [c for c in found if c.found]
    if not used:
        return GuidedImages(images, found)
    masks = torch.stack([c.mask for c in used]).unsqueeze(1).to(images.device)  # [K, 1, H, W]
    patterns = torch.stack([c.pattern for c in used]).to(images.device)  # [K, C, H, W]
    turn = torch.arange(len(images), device=images.device) % len(used)
    return GuidedImages(torch.cat([images, stamp(images, masks[turn], patterns[turn])]), found)
