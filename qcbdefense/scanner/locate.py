"""The trigger a quantized model answers most easily, for a defence to show its reconstruction (no verdict).

Trigger-guided calibration (`defenses.guide`) asks the scanner one question: which small trigger moves the
quantized model and not the FP model? Of the differential patches (`trigger_search`) that carry over to
held-out images (the scan's bar, `ScanConfig.min_success`), the smallest; when none does (a trigger obeyed only
now and then, as a 4-bit QCB deployed at 8 bits), the square that stands out in the square scan
(`square_scan`); else none. The answer carries the settings it was found with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qcbdefense.scanner.scan import ScanConfig
from qcbdefense.scanner.square_scan import SquareFind, SquareScanConfig, scan_squares, standing_out
from qcbdefense.scanner.trigger_search import ClassSearch, SearchConfig, search_triggers


@dataclass(frozen=True)
class LocateConfig:
    """How the trigger is looked for (recorded with what was found)."""

    search: SearchConfig = field(default_factory=SearchConfig)
    min_success: float = ScanConfig.min_success  # % of held-out images a patch must flip to count
    squares: SquareScanConfig = field(default_factory=SquareScanConfig)  # when no patch counts


@dataclass
class LocatedTrigger:
    """What was found: the kind ("patch", "square" or "none"), its class, its mask [H, W] and pattern
    [3, H, W]; every class's patch, the square scan's finds when it ran, the settings used, and the FP model's
    predictions on the images (for a caller that refines the find on them; not saved)."""

    kind: str
    target: int | None
    mask: torch.Tensor | None
    pattern: torch.Tensor | None
    patches: list[ClassSearch]
    squares: list[SquareFind] | None
    config: LocateConfig
    fp_preds: torch.Tensor

    def to_dict(self) -> dict:
        """Per class, the patch's area (pixels), held-out differential success % and whether one was found;
        the class whose patch (`patch`) or square (`square`) was chosen; the square scan's finds; the
        settings."""
        return {"kind": self.kind, "target": self.target,
                "classes": [{"class": c.target, "area": c.area, "success": c.success, "found": c.found}
                            for c in self.patches],
                "squares": None if self.squares is None else [asdict(find) for find in self.squares],
                "config": asdict(self.config)}


def locate_trigger(fp: nn.Module, quantized: nn.Module, images: torch.Tensor, config: LocateConfig = LocateConfig(),
                   *, seed: int = 0, chunk: int = 256, progress: bool = False) -> LocatedTrigger:
    """The trigger `quantized` answers most easily against `fp` on `images` (float [N, C, H, W] in [0, 1]),
    `chunk` images per forward pass of the FP predictions. Raises ValueError when the images are too few for
    a search batch in every class and a held-out set."""
    with torch.no_grad():
        logits = torch.cat([fp(part) for part in images.split(chunk)])
    fp_preds = logits.argmax(1)
    patches = search_triggers(fp, quantized, images, fp_preds, logits.shape[1], config.search, seed=seed,
                              progress=progress)
    carried = [c for c in patches if c.found and c.success >= config.min_success]
    if carried:
        patch = min(carried, key=lambda c: c.area)
        return LocatedTrigger("patch", patch.target, patch.mask, patch.pattern, patches, None, config, fp_preds)
    squares = scan_squares(fp, quantized, images, fp_preds, len(patches), config.squares, seed=seed)
    square = standing_out(squares)
    if square is None:
        return LocatedTrigger("none", None, None, None, patches, squares, config, fp_preds)
    mask, pattern = square.mask_and_pattern(*images.shape[-2:], seed)
    return LocatedTrigger("square", square.target, mask, pattern, patches, squares, config, fp_preds)
