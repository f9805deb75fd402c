"""Differential trigger search: the smallest patch that moves the quantized model and not the FP model.

Neural Cleanse looks for the smallest mask that sends one model to a class. A QCB hides from that in the FP
model, so here the patch must do two things at once: send the *quantized* model to class c while the *FP*
model keeps its own prediction. On a clean pair the two models compute nearly the same function, so no
small patch separates them; on a QCB pair the planted trigger does, and its class needs a far smaller mask
than every other class. All classes are searched together in one batch (one mask and pattern each) so a
scan costs one optimisation, not ten.

The mask weight λ of each class adapts as in Neural Cleanse: up while the patch succeeds (to shrink it), down
while it fails. The smallest mask that flips the batch overfits it: on the 16x16 QCBs of the scan campaign it
flipped as few held-out images as a clean pair's (a sparse-noise QCB's target: 5 px, 19 %), where an earlier,
larger mask of the same search carried over (21 px, 40 %). So each class keeps, of its best masks at the end of
every λ window, the one that flips the most of its own validation images; the held-out success is then measured
on other images still.

A patch that may blend into every pixel a little (a soft mask) finds small patches and blends, but not a
sparse-noise trigger: a few scattered pixels set to black or white. On the scan campaign's two sparse-noise
QCBs trained through the quantizer, the soft search kept diffuse 11-14 px masks that touched none of the
trigger's 15 pixels and carried to 15-17 % of held-out images, as a clean pair's best class may. With
`whole_pixels` the stamp replaces whole pixels: the forward pass thresholds the mask at one half, the gradient
flows through the soft mask (straight-through), and the kept masks are 0 / 1. That search found those two
targets carrying to 40-44 %, every other class at most 13 %, and no mask at all on the campaign's clean pairs
(BENCHMARKS.md, scanner; near the bars: a run with other float rounding carried them to 25 and 33 %); the scan
runs it as a fourth family, "sparse".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qcbdefense.scanner.robust import robust_z


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the differential trigger search (recorded in the scan report)."""

    images_per_class: int = 12  # images in each class's batch (the FP model must not already predict c)
    held_out: int = 48  # per class, images to choose the mask kept, and as many again to measure its success
    # 140: on the 15 pairs of experiments/scan_campaign.py and the demo's two, every verdict and score as at 200
    # (100 changed a score), in 0.7x the time (BENCHMARKS.md, speed)
    steps: int = 140
    lr: float = 0.1
    success: float = 0.8  # share of the batch that must flip differentially for a mask to count
    lambda_init: float = 1.0  # weight of the mask's mean (its area as a share of the image)
    lambda_factor: float = 1.5
    adapt_every: int = 10


@dataclass
class ClassSearch:
    """The best patch found for one class."""

    target: int
    area: float  # L1 (pixels) of the mask kept (`most_general`), which flipped >= success of the batch; else H x W
    success: float  # % of held-out images it flips differentially (quantized -> target, FP unchanged)
    found: bool
    mask: torch.Tensor  # [H, W] in [0, 1]
    pattern: torch.Tensor  # [3, H, W] in [0, 1]
    searched: bool = True  # False: the class was screened out (`scanner.screen`), nothing was searched
    rate: float = 0.0  # the largest share of its batch any step's patch flipped differentially (the screen's rank)


Candidate = tuple[float, torch.Tensor, torch.Tensor]  # a mask's area (pixels), the mask [H, W], its pattern


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Blend `pattern` into images `x` (pixels in [0, 1]) where `mask` is on."""
    return (1 - mask) * x + mask * pattern


def whole(mask: torch.Tensor) -> torch.Tensor:
    """`mask` thresholded at one half (whole pixels on or off), with the soft mask's gradient (straight-through)."""
    return (mask > 0.5).to(mask.dtype) + (mask - mask.detach())


def differential_success(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                         target: int, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Per image: does the stamped image send the quantized model to `target` while the FP model keeps its
    prediction?"""
    with torch.no_grad():
        xs = stamp(x, mask, pattern)
        return (quantized(xs).argmax(1) == target) & (fp(xs).argmax(1) == fp_preds)


def class_batches(fp_preds: torch.Tensor, num_classes: int, n: int, held: int, generator: torch.Generator
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per class c, a random batch of `n` indices of images the FP model does not put in c, the next `held`
    of them held out, and the `held` after those to choose among the search's masks (fewer where there are
    not enough)."""
    batches, held_out, validation = [], [], []
    for c in range(num_classes):
        idx = (fp_preds != c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        batches.append(idx[:n])
        held_out.append(idx[n:n + held])
        validation.append(idx[n + held:n + 2 * held])
    return batches, held_out, validation


def differential_terms(q_logits: torch.Tensor, fp_logits: torch.Tensor, targets: torch.Tensor,
                       fp_labels: torch.Tensor, groups: tuple[int, ...]):
    """One search step's objective per group of images (a class, or a family and a class), averaged over the
    group: the quantized model's cross-entropy to the target (flip), the FP model's to its own answer (keep),
    and the share of images where both hold (success, without gradient)."""
    shape = (*groups, -1)
    flip = F.cross_entropy(q_logits, targets, reduction="none").view(shape).mean(-1)
    keep = F.cross_entropy(fp_logits, fp_labels, reduction="none").view(shape).mean(-1)
    with torch.no_grad():
        ok = (q_logits.argmax(1) == targets) & (fp_logits.argmax(1) == fp_labels)
        rate = ok.float().view(shape).mean(-1)
    return flip, keep, rate


def adapt_weights(lam: torch.Tensor, hits: torch.Tensor, step: int, config: SearchConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neural Cleanse's schedule, per class: every `adapt_every` steps, raise the effort weight λ where the
    trigger succeeded on at least half of them, lower it elsewhere, and restart the count of successes."""
    if (step + 1) % config.adapt_every:
        return lam, hits
    succeeded = hits >= config.adapt_every // 2
    return (torch.where(succeeded, lam * config.lambda_factor, lam / config.lambda_factor),
            torch.zeros_like(hits))


def search_triggers(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                    num_classes: int, config: SearchConfig = SearchConfig(), *, seed: int = 0,
                    classes: Sequence[int] | None = None, whole_pixels: bool = False,
                    progress: bool = False) -> list[ClassSearch]:
    """Search every class (or only `classes`) at once on images `x` ([N, 3, H, W] in [0, 1]) with FP
    predictions `fp_preds`; one `ClassSearch` per class, `searched` False on the classes left out.
    `whole_pixels`: the stamp replaces whole pixels (module docstring), and masks and areas count them.

    For class c the search batch is the first `images_per_class` images the FP model does not put in c; the
    next `held_out` ones are held out to measure the success of the patch that was kept, and the
    ones after those choose it (`most_general`). Batches and starting patterns are drawn for every class, so a
    class searched with others left out starts as it would with all.
    """
    gen = torch.Generator().manual_seed(seed)
    n, h, w = config.images_per_class, x.shape[-2], x.shape[-1]
    batches, held_out, validation = class_batches(fp_preds, num_classes, n, config.held_out, gen)
    if any(len(b) < n for b in batches):
        raise ValueError(f"the trigger search needs {n} images outside each class; got fewer")
    chosen = list(range(num_classes)) if classes is None else sorted(set(classes))
    k = len(chosen)
    xb = torch.cat([x[batches[c]] for c in chosen])  # [k * n, 3, H, W]
    yb_fp = torch.cat([fp_preds[batches[c]] for c in chosen])
    targets = torch.tensor(chosen).repeat_interleave(n).to(x.device)

    mask_logit = torch.full((k, 1, h, w), -2.0, device=x.device).requires_grad_()
    pattern_logit = (torch.randn((num_classes, 3, h, w), generator=gen)[chosen] * 0.1).to(x.device).requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=config.lr)
    lam = torch.full((k,), config.lambda_init, device=x.device)
    best_area = torch.full((k,), float(h * w))
    best_mask = torch.zeros((k, 1, h, w))
    best_pattern = torch.zeros((k, 3, h, w))
    hits = torch.zeros(k, device=x.device)
    best_rate = torch.zeros(k)
    improved = torch.zeros(k, dtype=torch.bool)
    candidates: list[list[Candidate]] = [[] for _ in range(k)]  # per class, its best mask of each window
    for step in tqdm(range(config.steps), desc="trigger search", disable=not progress, leave=False):
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        shown = whole(mask) if whole_pixels else mask
        xs = stamp(xb, shown.repeat_interleave(n, 0), pattern.repeat_interleave(n, 0))
        flip, keep, rate = differential_terms(quantized(xs), fp(xs), targets, yb_fp, (k,))
        area = mask.flatten(1).mean(1)
        loss = (flip + keep + lam * area).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            pixels = shown.flatten(1).sum(1).cpu()
            better = (rate.cpu() >= config.success) & (pixels < best_area)
            best_area = torch.where(better, pixels, best_area)
            best_mask[better] = shown.detach().cpu()[better]
            best_pattern[better] = pattern.detach().cpu()[better]
            best_rate = torch.maximum(best_rate, rate.cpu())
            improved |= better
            if (step + 1) % config.adapt_every == 0 or step + 1 == config.steps:  # a λ window ends
                for i in improved.nonzero().flatten().tolist():
                    candidates[i].append((float(best_area[i]), best_mask[i, 0].clone(), best_pattern[i].clone()))
                improved[:] = False
            hits += rate >= config.success
            lam, hits = adapt_weights(lam, hits, step, config)
    results = [ClassSearch(target=c, area=float(h * w), success=0.0, found=False, mask=torch.zeros(h, w),
                           pattern=torch.zeros(3, h, w), searched=False) for c in range(num_classes)]
    for i, c in enumerate(chosen):
        found = bool(candidates[i])
        area, m, p = (most_general(fp, quantized, x[validation[c]], fp_preds[validation[c]], c, candidates[i])
                      if found else (float(h * w), best_mask[i, 0], best_pattern[i]))
        rest = held_out[c]
        success = 0.0
        if found and len(rest):
            ok = differential_success(fp, quantized, x[rest], fp_preds[rest], c, m.to(x.device), p.to(x.device))
            success = 100.0 * ok.float().mean().item()
        results[c] = ClassSearch(target=c, area=area, success=success, found=found, mask=m, pattern=p,
                                 rate=float(best_rate[i]))
    return results


def second_look(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor, num_classes: int,
                finds: list[ClassSearch], config: SearchConfig, *, seed: int, classes: int,
                whole_pixels: bool = False, progress: bool = False) -> list[ClassSearch]:
    """`finds` with the `classes` classes whose masks carried to the most held-out images searched again from
    another seed (other images, another start); each keeps whichever of its two finds carried further.

    Why: one whole-pixel search is a noisy measurement. Over runs that differed only in float rounding, a
    sparse-noise QCB's target carried to 15-44 % of held-out images, around the verdict's bars, while no class
    of a clean pair carried at all (BENCHMARKS.md, scanner). A second look at the strongest candidates costs
    `classes` classes' search, not all of them."""
    ranked = sorted((f for f in finds if f.searched and f.found), key=lambda f: (-f.success, f.target))
    top = [f.target for f in ranked[:classes]]
    if not top:
        return finds
    again = search_triggers(fp, quantized, x, fp_preds, num_classes, config, seed=seed + 1, classes=top,
                            whole_pixels=whole_pixels, progress=progress)
    return [again[f.target] if f.target in top and again[f.target].success > f.success else f for f in finds]


def likeliest(finds: list[ClassSearch], classes: int) -> list[int]:
    """The `classes` searched classes whose patches carried to the most held-out images (the smaller patch on a
    tie): where a narrower search looks.

    Why: on the scan campaign's QCBs the patch search (100 steps) ranked the target first on 38 of 44, all 12
    sparse-noise ones among them, though on 8 of those its soft patch carried to only 15-27 % of held-out images,
    too few to count (BENCHMARKS.md, scanner); so the whole-pixel search, which costs what the patch search does,
    runs on these."""
    ranked = sorted((f for f in finds if f.searched), key=lambda f: (-f.success, f.area, f.target))
    return [f.target for f in ranked[:classes]]


def most_general(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor, target: int,
                 candidates: list[Candidate]) -> Candidate:
    """Of a class's masks (area, mask, pattern; shrinking), the one that flips the most of images `x`
    differentially, the smaller on a tie; the smallest when there are no images to tell them apart."""
    if len(x) == 0:
        return candidates[-1]
    flips = [int(differential_success(fp, quantized, x, fp_preds, target, m.to(x.device), p.to(x.device)).sum())
             for _, m, p in candidates]
    return candidates[max(range(len(candidates)), key=lambda j: (flips[j], j))]


def anomaly_index(areas: list[float]) -> list[float]:
    """How far below the other classes each class's mask area lies, in robust standard deviations of the
    log-areas (median absolute deviation, as Neural Cleanse): large for a class that needs a tiny patch.

    The deviation is floored at log 2 (a factor of two between masks is noise), so classes that all failed
    (all at the image's area) give 0 rather than a division by zero.
    """
    return (-robust_z(torch.log(torch.tensor(areas).clamp_min(1.0)), floor=math.log(2))).tolist()
