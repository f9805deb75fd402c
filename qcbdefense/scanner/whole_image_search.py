"""Differential search over whole-image triggers: the weakest additive perturbation or blend that moves the
quantized model and not the FP model.

The patch search (`trigger_search`) asks for a small mask; a blended, warped or sparse-noise trigger covers
the whole image faintly, so no small mask reproduces it (issue 29: a blended QCB's class needed the smallest
mask, but that mask moved only 21 % of held-out images). Here two families cover the whole image instead:

- ``additive``: ``x + eps * tanh(v)``, one perturbation per class with an L-infinity budget ``eps``;
- ``blend``: ``(1 - alpha) x + alpha * pattern``, one pattern per class mixed in at ``alpha``.

The effort (``eps`` or ``alpha``) is itself learned, pulled down by a weight λ that adapts per class as the
patch search's mask weight does, and the smallest effort that flipped the batch is kept; each class's effort
is reported as a share of the family's largest (a class that never succeeded gets the whole budget). All
classes share one batch per family, and the search is short: a whole-image perturbation converges in a
few dozen steps where a mask needs a couple of hundred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from qcbdefense.scanner.trigger_search import SearchConfig, adapt_weights, class_batches, differential_terms

FAMILIES = ("additive", "blend")


@dataclass(frozen=True)
class WholeImageConfig:
    """Settings of the whole-image search (recorded in the scan report)."""

    steps: int = 28  # per family about a quarter of the patch search's images x steps
    lr: float = 0.1
    max_linf: float = 16 / 255  # the additive family's largest L-infinity budget (pixels in [0, 1])
    max_alpha: float = 0.3  # the blend family's largest mixing weight


@dataclass
class WholeImageFind:
    """The weakest whole-image trigger found for one class in one family."""

    family: str
    target: int
    effort: float  # the smallest eps or alpha that flipped >= success of the batch, as a share of the largest
    success: float  # % of held-out images it flips differentially (quantized -> target, FP unchanged)
    found: bool
    delta: torch.Tensor  # [3, H, W]: additive, the perturbation; blend, the pattern in [0, 1]
    strength: float  # eps or alpha itself
    searched: bool = True  # False: the class was screened out (`scanner.screen`), nothing was searched
    rate: float = 0.0  # the largest share of its batch any step's trigger flipped differentially

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger applied to images `x` (pixels in [0, 1])."""
        return apply_family(self.family, x, self.delta.to(x.device), self.strength)

    def to_dict(self) -> dict:
        return {"family": self.family, "target": self.target, "effort": self.effort, "success": self.success,
                "found": self.found, "strength": self.strength, "searched": self.searched,
                "rate": self.rate}


def apply_family(family: str, x: torch.Tensor, delta: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """``additive``: x + delta (delta already scaled; clipped to [0, 1]); ``blend``: x mixed with the
    pattern `delta` at weight `strength`."""
    if family == "additive":
        return (x + delta).clamp(0, 1)
    return (1 - strength) * x + strength * delta


@torch.no_grad()
def _held_out_success(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                      find: WholeImageFind) -> float:
    if not find.found or len(x) == 0:
        return 0.0
    xs = find.apply(x)
    ok = (quantized(xs).argmax(1) == find.target) & (fp(xs).argmax(1) == fp_preds)
    return 100.0 * ok.float().mean().item()


def search_whole_image(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                       num_classes: int, config: WholeImageConfig = WholeImageConfig(),
                       search: SearchConfig = SearchConfig(), *, seed: int = 0, classes: Sequence[int] | None = None,
                       progress: bool = False) -> dict[str, list[WholeImageFind]]:
    """Search both families for every class (or only `classes`) at once on images `x` ([N, 3, H, W] in
    [0, 1]) with FP predictions `fp_preds`; per family, one find per class (`searched` False on the classes
    left out). Batches, held-out images, the success bar and the λ schedule are the patch search's
    (`search`)."""
    gen = torch.Generator().manual_seed(seed + 1)  # not the patch search's draw: other images, other starts
    n, shape = search.images_per_class, x.shape[-3:]
    batches, held_out, _ = class_batches(fp_preds, num_classes, n, search.held_out, gen)
    if any(len(b) < n for b in batches):
        raise ValueError(f"the trigger search needs {n} images outside each class; got fewer")
    chosen = list(range(num_classes)) if classes is None else sorted(set(classes))
    k = len(chosen)
    xb = torch.cat([x[batches[c]] for c in chosen])
    yb_fp = torch.cat([fp_preds[batches[c]] for c in chosen])
    targets = torch.tensor(chosen, device=x.device).repeat_interleave(n)
    largest = torch.tensor([config.max_linf, config.max_alpha], device=x.device)[:, None]  # [family, 1]

    effort_logit = torch.zeros((2, k), device=x.device, requires_grad=True)
    shape_logit = (torch.randn((2, num_classes, *shape), generator=gen)[:, chosen] * 0.5).to(x.device)
    shape_logit.requires_grad_()
    optimizer = torch.optim.Adam([effort_logit, shape_logit], lr=config.lr)
    lam = torch.full((2, k), search.lambda_init, device=x.device)
    best = torch.ones((2, k))
    best_shape = torch.zeros((2, k, *shape))
    hits = torch.zeros((2, k), device=x.device)
    best_rate = torch.zeros((2, k))
    for step in tqdm(range(config.steps), desc="whole-image search", disable=not progress, leave=False):
        optimizer.zero_grad()
        # one family's batch at a time, forward and backward (their parameters are apart): on 2 CPU cores a
        # ResNet-20 pass over 240 images cost a quarter more per image than over 120
        efforts, shapes, rates = [], [], []
        for f, family in enumerate(FAMILIES):
            share = torch.sigmoid(effort_logit[f])  # [class], a share of the family's largest
            strength = (share * largest[f])[:, None, None, None]
            if family == "additive":
                kept = torch.tanh(shape_logit[f]) * strength  # the perturbation itself
                xs = apply_family(family, xb, kept.repeat_interleave(n, 0), 0.0)
            else:
                kept = torch.sigmoid(shape_logit[f])  # the pattern
                xs = apply_family(family, xb, kept.repeat_interleave(n, 0), strength.repeat_interleave(n, 0))
            flip, keep, rate = differential_terms(quantized(xs), fp(xs), targets, yb_fp, (k,))
            (flip + keep + lam[f] * share).sum().backward()
            efforts.append(share.detach())
            shapes.append(kept.detach())
            rates.append(rate)
        optimizer.step()
        with torch.no_grad():
            effort, rate = torch.stack(efforts), torch.stack(rates)  # [family, class]
            better = (rate.cpu() >= search.success) & (effort.cpu() < best)
            best = torch.where(better, effort.cpu(), best)
            best_shape[better] = torch.stack(shapes).cpu()[better]
            best_rate = torch.maximum(best_rate, rate.cpu())
            hits += rate >= search.success
            lam, hits = adapt_weights(lam, hits, step, search)
    finds: dict[str, list[WholeImageFind]] = {}
    for f, family in enumerate(FAMILIES):
        finds[family] = [WholeImageFind(family, c, 1.0, 0.0, False, torch.zeros(shape), float(largest[f, 0]),
                                        searched=False) for c in range(num_classes)]
        for i, c in enumerate(chosen):
            found = bool(best[f, i] < 1.0)
            find = WholeImageFind(family, c, float(best[f, i]), 0.0, found, best_shape[f, i],
                                  float(best[f, i] * largest[f, 0]), rate=float(best_rate[f, i]))
            rest = held_out[c]
            find.success = _held_out_success(fp, quantized, x[rest], fp_preds[rest], find)
            finds[family][c] = find
    return finds
