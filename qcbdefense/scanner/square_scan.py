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

The same squares serve a second purpose, the scan's "square" family (`probe_squares`): a patch trigger whose
differential effect is a needle. A CompArtifact patch QCB of the scan campaign (small_cnn, 16x16) flips 82 % of
images differentially with its own 4x4 white square, but one pixel off the FP model obeys the square too, so the
patch search's gradients, which start from a diffuse mask, never reach it (its target's best mask carried to 15 %).
The probe scores every square by the share of a few images it moves differentially (quantized to the class, FP
unmoved), scores each class's shortlist again on more images, and measures the best on held-out images: that
QCB's target at 83 %, a clean pair's classes at most 23 % (BENCHMARKS.md, scanner). A patch of a colour or
pattern no fill has is found in place but half-matched (a green 3x3 patch's place by a noise square, 25 %), so
each class's best square then has its pixels learnt from grey for a few steps with the trigger search's objective,
and keeps them when they flip more (that patch: 31 %; a yellow / blue checkered one, 58 %). Its cost is bounded
(`SquareProbeConfig.max_pairs`: the stride grows with the image). The passes over candidates are forward only,
batched; only the pixel learning takes gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qcbdefense.scanner.robust import robust_z
from qcbdefense.scanner.trigger_search import differential_success, differential_terms, stamp


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
    batch: int = 256  # images per forward pass (candidates x images), as the probe's


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
        return square_stamp((self.top, self.left, self.size, self.fill), h, w, seed)


def square_stamp(square: "Square", h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A square (top, left, size, fill) as a stamp: mask [H, W] and pattern [3, H, W]."""
    top, left, size, fill = square
    mask = torch.zeros(h, w)
    mask[top:top + size, left:left + size] = 1
    return mask, fill_pattern(fill, h, w, seed)


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


Square = tuple[int, int, int, str]  # a candidate square: top, left, size, fill


def square_candidates(h: int, w: int, sizes: tuple[int, ...], stride: int, fills: tuple[str, ...]) -> list[Square]:
    """Every square of each size at every `stride`-th place of an H x W image, in each fill."""
    return [(top, left, size, fill) for size in sizes for top in range(0, h - size + 1, stride)
            for left in range(0, w - size + 1, stride) for fill in fills]


def stamp_squares(xs: torch.Tensor, squares: list[Square], patterns: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images `xs` [N, 3, H, W] stamped with each square in turn: [len(squares) * N, 3, H, W], square-major."""
    h, w = xs.shape[-2:]
    masks = torch.zeros(len(squares), 1, h, w, device=xs.device)
    for i, (top, left, size, _) in enumerate(squares):
        masks[i, :, top:top + size, left:left + size] = 1
    fills = torch.stack([patterns[fill] for *_, fill in squares])
    return stamp(xs[None], masks[:, None], fills[:, None]).flatten(0, 1)


def log_prob_gap(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """[N, classes]: log q(c | x) - log fp(c | x), `batch` images per forward pass."""
    return torch.cat([torch.log_softmax(quantized(part), 1) - torch.log_softmax(fp(part), 1)
                      for part in x.split(batch)])


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
    candidates = square_candidates(h, w, config.sizes, config.stride, config.fills)
    patterns = {fill: fill_pattern(fill, h, w, seed).to(x.device) for fill in config.fills}
    per_pass = max(config.batch // len(xs), 1)
    best_gap = torch.full((num_classes,), -torch.inf, device=x.device)
    best_index = torch.zeros(num_classes, dtype=torch.long, device=x.device)
    for start in range(0, len(candidates), per_pass):
        chunk = candidates[start:start + per_pass]
        stamped = stamp_squares(xs, chunk, patterns)
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
    noise = max(torch.tensor(spreads).median().item() if spreads else 0.0, 0.1)  # floored as the lifts' deviation
    # how far above the others each lift lies, the deviation floored at 0.1 nats: classes all near zero score small
    for find, z in zip(finds, robust_z(torch.tensor([f.gap for f in finds]), floor=0.1).tolist()):
        find.anomaly, find.effect = z, find.gap / noise
    top_find = max(finds, key=lambda f: f.gap)
    top_find.found = (top_find.gap >= config.min_gap and top_find.anomaly >= config.min_anomaly
                      and top_find.effect >= config.min_effect)
    return finds


def standing_out(finds: list[SquareFind] | None) -> SquareFind | None:
    """The square that stands out among `scan_squares`' finds (it marks one class at most), or None."""
    return next((find for find in finds or () if find.found), None)


@dataclass(frozen=True)
class SquareProbeConfig:
    """Settings of the differential square probe, the scan's "square" family (recorded in the scan report)."""

    sizes: tuple[int, ...] = (3, 4, 5)
    fills: tuple[str, ...] = ("white", "black", "checker", "noise")
    images: int = 4  # the first pass scores every candidate on these images ...
    # ... and the stride grows from 1 until candidates x images fit here (16x16: stride 1, 2,036 candidates;
    # 32x32: stride 3, 1,200)
    max_pairs: int = 8192
    shortlist: int = 4  # per class, the first pass's best candidates, scored again on `rerank` further images
    rerank: int = 16
    held_out: int = 48  # per class, further images the FP model puts elsewhere: the kept square's success
    # each class's best square then has its pixels optimised for the class (differentially, on the rerank images,
    # from grey) for this many steps, and keeps them if they flip more of those images: a patch of a colour
    # or pattern no fill has (0: no refinement)
    refine_steps: int = 20
    refine_lr: float = 0.1
    batch: int = 256  # images per forward pass (a ResNet-20 pass over 512 images cost 1.7x per image what it did
    # over 256 on 2 CPU cores: the activations outgrow the cache)


@dataclass
class ProbedSquare:
    """One class's best square of the probe: where, how large, its fill, and how often it moves the
    quantized model to the class with the FP model unmoved."""

    target: int
    top: int
    left: int
    size: int
    fill: str
    stride: int  # the probe's stride
    rate: float  # share of the rerank images (the FP model elsewhere) it flipped differentially
    success: float  # % of held-out images it flips differentially
    searched: bool = True  # False: the class was screened out (`scanner.screen`): no held-out measurement
    pattern: torch.Tensor | None = None  # [3, H, W]: the refined pixels, when refining beat the fill

    @property
    def pixels(self) -> int:
        return self.size * self.size

    def mask_and_pattern(self, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask, pattern = square_stamp((self.top, self.left, self.size, self.fill), h, w, seed)
        return mask, pattern if self.pattern is None else self.pattern


def probe_stride(h: int, w: int, config: SquareProbeConfig) -> int:
    """The smallest stride whose candidates, each on `config.images` images, fit `config.max_pairs`."""
    stride = 1
    while (len(square_candidates(h, w, config.sizes, stride, config.fills)) * config.images > config.max_pairs
           and stride < max(h, w)):
        stride += 1
    return stride


def differential_scores(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                        squares: list[Square], patterns: dict[str, torch.Tensor], num_classes: int, batch: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [squares, classes] tensors: per square and class c, over the images `x` the FP model puts elsewhere,
    the share the stamp sends the quantized model to c with the FP model unmoved, and the mean log-probability
    gap of c (quantized minus FP), which ranks squares of equal share."""
    others = (fp_preds[:, None] != torch.arange(num_classes, device=x.device)).float()  # [images, classes]
    counts = others.sum(0).clamp_min(1)
    per_pass = max(batch // len(x), 1)
    shares, gaps = [], []
    for chunk in (squares[i:i + per_pass] for i in range(0, len(squares), per_pass)):
        stamped = stamp_squares(x, chunk, patterns)
        q_logits, fp_logits = quantized(stamped), fp(stamped)
        kept = (fp_logits.argmax(1) == fp_preds.repeat(len(chunk))).view(len(chunk), len(x), 1)
        moved = F.one_hot(q_logits.argmax(1), num_classes).view(len(chunk), len(x), num_classes).bool()
        gap = (torch.log_softmax(q_logits, 1) - torch.log_softmax(fp_logits, 1)).view(len(chunk), len(x), -1)
        shares.append(((moved & kept).float() * others).sum(1) / counts)
        gaps.append((gap * others).sum(1) / counts)
    return torch.cat(shares), torch.cat(gaps)


def ranking(share: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """Share first, the gap among equal shares (its weight keeps it under one image's share in 64)."""
    return share + 1e-4 * gap.clamp(-100, 100)


@torch.no_grad()
def probe_squares(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor, num_classes: int,
                  config: SquareProbeConfig = SquareProbeConfig(), *, seed: int = 0,
                  classes: list[int] | None = None) -> list[ProbedSquare]:
    """Per class, the square (of `config`'s sizes and fills, at every stride-th place) that best moves the
    quantized model to the class while the FP model keeps its answer: scored on a few of the images `x` ([N, 3,
    H, W] in [0, 1], FP predictions `fp_preds`), each class's shortlist scored again on more, the best's pixels
    refined (`refine_squares`), and the result measured on held-out images. `classes`: the ones measured (the
    rest `searched` False).
    """
    h, w = x.shape[-2:]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    first, second = order[:config.images], order[config.images:config.images + config.rerank]
    rest = order[config.images + config.rerank:]
    if len(second) < config.rerank or len(rest) == 0:
        raise ValueError(f"the square probe needs more than {config.images + config.rerank} images; got {len(x)}")
    stride = probe_stride(h, w, config)
    squares = square_candidates(h, w, config.sizes, stride, config.fills)
    if not squares:  # images smaller than every square: nothing to probe
        return [ProbedSquare(c, 0, 0, 0, "", stride, 0.0, 0.0, searched=False) for c in range(num_classes)]
    patterns = {fill: fill_pattern(fill, h, w, seed).to(x.device) for fill in config.fills}
    first_pass = ranking(*differential_scores(fp, quantized, x[first], fp_preds[first], squares, patterns,
                                              num_classes, config.batch))
    shortlist = first_pass.topk(min(config.shortlist, len(squares)), dim=0).indices  # [shortlist, classes]
    listed = sorted(set(shortlist.flatten().tolist()))
    share, gap = differential_scores(fp, quantized, x[second], fp_preds[second], [squares[i] for i in listed],
                                     patterns, num_classes, config.batch)
    again = ranking(share, gap)
    row = {index: i for i, index in enumerate(listed)}
    chosen = [c for c in range(num_classes) if classes is None or c in classes]
    best = {c: max(shortlist[:, c].tolist(), key=lambda i: (float(again[row[i], c]), -i)) for c in range(num_classes)}
    rates = {c: float(share[row[best[c]], c]) for c in range(num_classes)}
    stamps = {c: [t.to(x.device) for t in square_stamp(squares[best[c]], h, w, seed)] for c in chosen}
    refined = (refine_squares(fp, quantized, x[second], fp_preds[second], {c: mask for c, (mask, _) in stamps.items()},
                              config) if config.refine_steps and stamps else {})
    finds = []
    for c in range(num_classes):
        top, left, size, fill = squares[best[c]]
        success, learnt = 0.0, None
        if c in stamps:
            mask, shown = stamps[c]
            if c in refined and refined[c][0] > rates[c]:  # the optimised pixels flip more than the fill
                rates[c], learnt = refined[c]
                shown = learnt
            held = rest[fp_preds[rest] != c][:config.held_out]
            if len(held):
                success = 100.0 * differential_success(fp, quantized, x[held], fp_preds[held], c, mask,
                                                        shown).float().mean().item()
        finds.append(ProbedSquare(c, top, left, size, fill, stride, rate=rates[c], success=success,
                                  searched=c in stamps, pattern=None if learnt is None else learnt.cpu()))
    return finds


def refine_squares(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, fp_preds: torch.Tensor,
                   masks: dict[int, torch.Tensor], config: SquareProbeConfig) -> dict[int, tuple[float, torch.Tensor]]:
    """Per class c of `masks` (its square's mask [H, W]), the square's pixels learnt to send the quantized model
    to c with the FP model unmoved (the trigger search's objective, `differential_terms`) on images `x`, all
    classes in one batch; returns c -> (share of the images the FP model puts elsewhere flipped differentially,
    the pattern [3, H, W]). The mask stays put: only what the square shows is learnt.

    The pixels start grey and are learnt as they are, clipped to [0, 1] after each step: a trigger's colours
    are often saturated, where a sigmoid's gradient vanishes, and the probe's fill can sit in a basin of its own.
    In the scan campaign a yellow / blue checkered patch QCB's square (one column off the trigger) flipped 4 % of
    held-out images white or learnt from white through a sigmoid, 58 % learnt this way (BENCHMARKS.md, scanner)."""
    classes = list(masks)
    stacked = torch.stack([masks[c] for c in classes])[:, None]  # [k, 1, H, W]
    pixels = torch.full((len(classes), 3, *stacked.shape[-2:]), 0.5, device=x.device, requires_grad=True)
    optimizer = torch.optim.Adam([pixels], lr=config.refine_lr)
    targets = torch.tensor(classes, device=x.device).repeat_interleave(len(x))
    labels = fp_preds.repeat(len(classes))
    others = (labels != targets).float()
    with torch.enable_grad():
        for _ in range(config.refine_steps):
            stamped = stamp(x[None], stacked[:, None], pixels[:, None]).flatten(0, 1)
            flip, keep, _ = differential_terms(quantized(stamped), fp(stamped), targets, labels, (len(classes),))
            optimizer.zero_grad()
            (flip + keep).sum().backward()
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0, 1)
    patterns = pixels.detach()
    stamped = stamp(x[None], stacked[:, None], patterns[:, None]).flatten(0, 1)
    hits = ((quantized(stamped).argmax(1) == targets) & (fp(stamped).argmax(1) == labels)).float() * others
    shares = (hits.view(len(classes), -1).sum(1) / others.view(len(classes), -1).sum(1).clamp_min(1)).tolist()
    return {c: (shares[i], patterns[i]) for i, c in enumerate(classes)}
