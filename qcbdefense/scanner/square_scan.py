"""Differential square scan: find a trigger the quantized model obeys only now and then.

The differential trigger search (`trigger_search`) asks a patch to *flip* most of its batch. A QCB planted at
4 bits and deployed at 8 leaks more weakly: the true trigger sends one image in ten to the target, so no patch
reaches the search's bar and gradient descent from a diffuse mask finds nothing either (docs/notebook.md, the
8-bit leak). What the weak trigger still does is raise the target's log-probability in the quantized model
far above the FP model's on almost every image: the *gap* log q(c | x') - log fp(c | x'), averaged over images,
was 2.8 nats for the true trigger and under 0.6 for any other class's best square on a measured model.

So instead of optimising, the scan tries solid, checkered and noise squares at every `stride`-th place
(patch triggers are small squares; a trigger of another shape still overlaps one), scores each by its mean gap
for every class at once on a few images, and re-measures each class's best square on held-out images. What
counts is what the square *adds*: on each image, the stamped image's gap minus the clean image's, so a class
the quantized model favours everywhere is not mistaken for a trigger's. A class is reported as found when that
lift is large in itself, stands far above the other classes' (robust z-score), and exceeds the spread of the
clean gap, the pair's own quantization noise: 4-bit rounding of a clean ResNet-20 moves a class's gap by
about 3 nats from image to image, and a square that lifts a class by 1.6 nats there is noise, where at 8 bits
(spread 0.2) a lift of 2.4 is a trigger (docs/notebook.md, the scanner's square scan).
Forward passes only, batched over candidates: no gradients, so nothing depends on a learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.scanner.trigger_search import stamp


@dataclass(frozen=True)
class SquareScanConfig:
    """Settings of the square scan (recorded in the purify report)."""

    sizes: tuple[int, ...] = (5,)  # side in pixels; at stride 2 a 5x5 square covers most of any 3x3 or 4x4 one
    stride: int = 2
    fills: tuple[str, ...] = ("white", "black", "checker", "noise")
    images: int = 16  # images every candidate is scored on (784 candidates on 32x32: 12,544 forward passes)
    held_out: int = 256  # further images each class's best square is re-measured on
    min_gap: float = 0.5  # nats: a found square lifts its class's gap (stamped minus clean) this much on average
    min_anomaly: float = 3.0  # ... lies this many robust std above the other classes' best squares
    min_effect: float = 1.0  # ... and this many times the spread of the clean gap (the pair's quantization noise)
    batch: int = 512  # images per forward pass (candidates x images)


@dataclass
class SquareFind:
    """The square with the largest mean gap for one class."""

    target: int
    top: int
    left: int
    size: int
    fill: str
    scan_gap: float  # mean lift of the gap (nats, stamped minus clean) on the scanned images
    gap: float  # mean lift on held-out images the FP model puts elsewhere
    anomaly: float = 0.0  # robust std above the other classes' held-out lifts
    effect: float = 0.0  # the lift in units of the clean gap's spread (median over classes of its std, >= 0.1)
    found: bool = False

    def mask_and_pattern(self, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The square as a stamp: mask [H, W] and pattern [3, H, W] (noise seeded as in the scan)."""
        mask = torch.zeros(h, w)
        mask[self.top:self.top + self.size, self.left:self.left + self.size] = 1
        return mask, fill_pattern(self.fill, h, w, seed)


def fill_pattern(fill: str, h: int, w: int, seed: int) -> torch.Tensor:
    """A [3, H, W] pattern in [0, 1]: white, black, a one-pixel checkerboard, or seeded uniform noise."""
    if fill == "white":
        return torch.ones(3, h, w)
    if fill == "black":
        return torch.zeros(3, h, w)
    if fill == "checker":
        return ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2).float().expand(3, h, w).clone()
    if fill == "noise":
        return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown fill {fill!r}")


def log_prob_gap(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """[N, classes]: log q(c | x) - log fp(c | x), `batch` images per forward pass."""
    return torch.cat([torch.log_softmax(quantized(part), 1) - torch.log_softmax(fp(part), 1)
                      for part in x.split(batch)])


def robust_z(values: list[float]) -> list[float]:
    """How far above the others each value lies, in robust standard deviations (median absolute deviation),
    the deviation floored at 0.1 nats so that classes that all sit near zero give small scores."""
    v = torch.tensor(values)
    median = v.median()
    mad = 1.4826 * (v - median).abs().median()
    return ((v - median) / mad.clamp_min(0.1)).tolist()


@torch.no_grad()
def scan_squares(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor, num_classes: int,
                 config: SquareScanConfig = SquareScanConfig(), *, seed: int = 0) -> list[SquareFind]:
    """Score every candidate square on `config.images` of `x` ([N, 3, H, W] in [0, 1], FP predictions
    `fp_preds`) and re-measure each class's best on the next `config.held_out`; one `SquareFind` per class,
    `found` set on the class that passes the three bars (at most one: the largest lift)."""
    h, w = x.shape[-2:]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    scanned, held = order[:config.images], order[config.images:config.images + config.held_out]
    if len(scanned) < config.images or len(held) == 0:
        raise ValueError(f"the square scan needs more than {config.images} images; got {len(x)}")
    xs, others = x[scanned], (fp_preds[scanned, None] != torch.arange(num_classes, device=x.device)).float()
    clean_gap = log_prob_gap(fp, quantized, x[torch.cat([scanned, held])], config.batch)
    scanned_base = (clean_gap[:len(scanned)] * others).sum(0) / others.sum(0).clamp_min(1)  # [classes]
    held_gap = clean_gap[len(scanned):]
    candidates = [(top, left, size, fill) for size in config.sizes for top in range(0, h - size + 1, config.stride)
                  for left in range(0, w - size + 1, config.stride) for fill in config.fills]
    patterns = {fill: fill_pattern(fill, h, w, seed).to(x.device) for fill in config.fills}
    per_pass = max(config.batch // len(xs), 1)
    best_gap = torch.full((num_classes,), -torch.inf, device=x.device)
    best_index = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    for start in range(0, len(candidates), per_pass):
        chunk = candidates[start:start + per_pass]
        masks = torch.zeros(len(chunk), 1, h, w, device=x.device)
        fills = torch.stack([patterns[fill] for *_, fill in chunk])
        for i, (top, left, size, _) in enumerate(chunk):
            masks[i, :, top:top + size, left:left + size] = 1
        stamped = stamp(xs[None], masks[:, None], fills[:, None]).flatten(0, 1)  # [chunk * images, 3, H, W]
        gaps = log_prob_gap(fp, quantized, stamped, config.batch).view(len(chunk), len(xs), num_classes)
        mean = (gaps * others).sum(1) / others.sum(0).clamp_min(1) - scanned_base  # [chunk, classes]
        value, index = mean.max(0)
        better = value > best_gap
        best_gap = torch.where(better, value, best_gap)
        best_index = torch.where(better, index + start, best_index)

    finds, spreads = [], []
    for c in range(num_classes):
        top, left, size, fill = candidates[int(best_index[c])]
        find = SquareFind(c, top, left, size, fill, scan_gap=float(best_gap[c]), gap=0.0)
        rest = fp_preds[held] != c
        if rest.sum() > 1:
            mask, pattern = find.mask_and_pattern(h, w, seed)
            stamped = stamp(x[held[rest]], mask.to(x.device), pattern.to(x.device))
            find.gap = float((log_prob_gap(fp, quantized, stamped, config.batch)[:, c] - held_gap[rest, c]).mean())
            spreads.append(float(held_gap[rest, c].std()))
        finds.append(find)
    noise = max(torch.tensor(spreads).median().item() if spreads else 0.0, 0.1)  # floored as robust_z's deviation
    for find, z in zip(finds, robust_z([f.gap for f in finds])):
        find.anomaly, find.effect = z, find.gap / noise
    top_find = max(finds, key=lambda f: f.gap)
    top_find.found = (top_find.gap >= config.min_gap and top_find.anomaly >= config.min_anomaly
                      and top_find.effect >= config.min_effect)
    return finds


def standing_out(finds: list[SquareFind] | None) -> SquareFind | None:
    """The square that stands out among `scan_squares`' finds (it marks one class at most), or None."""
    return next((find for find in finds or () if find.found), None)
