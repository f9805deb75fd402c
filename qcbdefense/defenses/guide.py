"""Trigger-guided calibration (beyond the LAC release): show the reconstruction where the models part.

LAC matches the FP model's activations on clean images. A QCB whose quantized model still answers the
trigger through activation rounding alone (measured on Qu-ANTI-zation, docs/notebook.md) survives that: clean
images never carry the trigger, so nothing asks the purified model to ignore it. The scanner (`scanner.locate`)
finds, for every class, a small patch that sends the round-to-nearest model to that class while the FP model
keeps its prediction; of the patches that carry over to held-out images, the smallest is the one the quantized
model answers most easily (a planted target when there is one). A stamped copy of every calibration image
carries that patch, so the reconstruction also sees where the two models part, and there the FP model's
activations are what the purified model must reproduce. No labels, no trigger and no verdict are needed: on a clean pair no patch
usually carries over, and then nothing is added.

The search's area penalty shaves the patch to the trigger's most telling pixels (a quarter of a 4x4 trigger on
a measured model), which moves fewer images than the trigger does. So before stamping, the patch is refined:
a square one pixel wider than its core, on the core's centre, whose pattern is optimised with the search's
own loss; the copies carry whichever of patch and square moves more calibration images.
(Spreading the copies over every class's patch, or by inverse area, purified less: docs/notebook.md.)

A trigger the quantized model obeys only now and then (a 4-bit QCB deployed at 8 bits) flips too few images
for any patch to carry over. Then the scanner answers with the square that raises one class's quantized
log-probability far above the FP model's (its square scan), and the copies carry that square as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.errors import InputError
from qcbdefense.scanner.locate import LocateConfig, LocatedTrigger, locate_trigger
from qcbdefense.scanner.square_scan import SquareFind
from qcbdefense.scanner.trigger_search import ClassSearch, differential_success, stamp


@dataclass(frozen=True)
class RefineConfig:
    """How the stamped patch is refined (recorded in the purify report)."""

    slack: int = 1      # pixels added to the side of the square around the patch's core
    steps: int = 100    # Adam steps on the square's pattern
    batch: int = 64
    lr: float = 0.1


@dataclass
class Refinement:
    """The square grown from the stamped patch, and how each flips calibration images (%, differentially)."""

    top: int
    left: int
    side: int
    success: float
    patch_success: float

    @property
    def used(self) -> bool:
        return self.success > self.patch_success


@dataclass
class GuidedImages:
    """The calibration images followed by their stamped copies, what the scanner found, and the refinement of
    a found patch with the settings it ran with."""

    images: torch.Tensor
    trigger: LocatedTrigger
    refined: Refinement | None = None
    refine_config: RefineConfig = field(default_factory=RefineConfig)

    @property
    def found(self) -> list[ClassSearch]:
        return self.trigger.patches

    @property
    def squares(self) -> list[SquareFind] | None:
        return self.trigger.squares

    @property
    def stamped(self) -> int | None:
        """The class whose patch was stamped (None when no patch carried over)."""
        return self.trigger.target if self.trigger.kind == "patch" else None

    @property
    def square_stamped(self) -> int | None:
        """The class whose square was stamped (None when the square scan did not run or found none)."""
        return self.trigger.target if self.trigger.kind == "square" else None

    def to_dict(self) -> dict:
        """Per class: the patch's area (pixels) and held-out differential success %; the class whose patch was
        stamped; its refinement; the square scan's finds and the class whose square was stamped; the number of
        images reconstructed on; the settings the scanner and the refinement ran with."""
        found = self.trigger.to_dict()
        refined = None if self.refined is None else {**vars(self.refined), "used": self.refined.used,
                                                     "config": asdict(self.refine_config)}
        squares = None if self.squares is None else {"classes": found["squares"], "stamped": self.square_stamped}
        return json.loads(json.dumps({"classes": found["classes"], "stamped": self.stamped, "refined": refined,
                                      "squares": squares, "images": len(self.images), "config": found["config"]}))


def with_found_triggers(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, *, seed: int = 0,
                        config: LocateConfig = LocateConfig(), refine: RefineConfig = RefineConfig(),
                        progress: bool = False) -> GuidedImages:
    """Ask the scanner (`locate_trigger`) for the trigger the calibrated round-to-nearest `qmodel` answers most
    easily against `fp_model` on `images` (float [N, C, H, W] in [0, 1]), and append a copy of every image
    stamped with it: a found patch is first refined into a square (`refine_patch`), stamped instead when it flips
    more images. When the scanner finds nothing the images come back alone. Neither model is modified."""
    try:  # the scanner refuses too few calibration images (a search batch in every class; a held-out set)
        trigger = locate_trigger(fp_model, qmodel, images, config, seed=seed, progress=progress)
    except ValueError as err:
        raise InputError(f"search_triggers: {err} (use more calibration images)") from None
    if trigger.kind == "none":
        return GuidedImages(images, trigger, refine_config=refine)
    mask, pattern = trigger.mask.to(images.device), trigger.pattern.to(images.device)
    refinement = None
    if trigger.kind == "patch":
        refined = refine_patch(fp_model, qmodel, images, trigger.fp_preds, trigger.patches[trigger.target],
                               config=refine, seed=seed)
        if refined is not None:
            refinement, square, square_pattern = refined
            if refinement.used:
                mask, pattern = square, square_pattern
    return GuidedImages(torch.cat([images, stamp(images, mask, pattern)]), trigger, refinement, refine)


def patch_core(mask: torch.Tensor) -> torch.Tensor:
    """The searched mask's own pixels (>= half its peak), without the faint rest a sigmoid mask keeps."""
    return mask * (mask >= 0.5 * mask.max())


def square_on(core: torch.Tensor, side: int) -> tuple[int, int, torch.Tensor]:
    """A `side` x `side` mask centred on the core's weighted centre, moved inside the image: (top, left, mask)."""
    h, w = core.shape
    cy = float((core.sum(1) * torch.arange(h)).sum() / core.sum())
    cx = float((core.sum(0) * torch.arange(w)).sum() / core.sum())
    top = min(max(round(cy - (side - 1) / 2), 0), h - side)
    left = min(max(round(cx - (side - 1) / 2), 0), w - side)
    square = torch.zeros(h, w)
    square[top:top + side, left:left + side] = 1
    return top, left, square


def refine_patch(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, fp_preds: torch.Tensor,
                 patch: ClassSearch, *, config: RefineConfig = RefineConfig(),
                 seed: int = 0) -> tuple[Refinement, torch.Tensor, torch.Tensor] | None:
    """Grow `patch` to a square `config.slack` pixels wider than its core (the pixels at >= half the mask's
    peak), centred on the core, and optimise the square's pattern to send `qmodel` to the patch's class while
    `fp_model` keeps `fp_preds`, on the images the FP model puts elsewhere. Returns the refinement (both
    successes measured on those images), the square mask [H, W] and its pattern [3, H, W]; None when the
    patch has no core (an empty mask already flips the quantized model) or every image is in its class."""
    device = images.device
    core = patch_core(patch.mask)
    others = fp_preds != patch.target
    if core.sum() <= 0 or not others.any():
        return None
    rows, cols = core.sum(1).nonzero().flatten(), core.sum(0).nonzero().flatten()
    side = min(int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1 + config.slack, *core.shape)
    top, left, square = square_on(core, side)
    square = square.to(device)

    x, keep = images[others], fp_preds[others]
    logit = torch.logit(patch.pattern.to(device).clamp(0.01, 0.99)).requires_grad_()
    optimizer = torch.optim.Adam([logit], lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    target = torch.full((config.batch,), patch.target, device=device)
    for _ in range(config.steps):
        idx = torch.randint(len(x), (config.batch,), generator=generator).to(device)
        xs = stamp(x[idx], square, torch.sigmoid(logit))
        loss = F.cross_entropy(qmodel(xs), target) + F.cross_entropy(fp_model(xs), keep[idx])
        (logit.grad,) = torch.autograd.grad(loss, logit)  # the models' own .grad stay untouched
        optimizer.step()
    pattern = torch.sigmoid(logit).detach()

    def success(m: torch.Tensor, p: torch.Tensor) -> float:
        return 100.0 * torch.cat([differential_success(fp_model, qmodel, part, part_fp, patch.target, m, p)
                                  for part, part_fp in zip(x.split(256), keep.split(256))]).float().mean().item()

    refined = Refinement(top, left, side, success(square, pattern),
                         success(patch.mask.to(device), patch.pattern.to(device)))
    return refined, square, pattern
