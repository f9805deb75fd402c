"""The scan's verdict: one score per class from every kind of evidence, and the line it must cross.

Each signal is scaled so that 1.0 is "enough on its own" for the searches and less for the rest:

- **search** (per class): for each trigger family (patch, sparse, square, additive, blend), the class's anomaly
  index (how far below the other classes its effort lies, `trigger_search.anomaly_index`) over `min_anomaly`,
  counted only when the trigger carries over to held-out images (`min_success`) and is cheap in absolute terms
  (`max_area` of the image for a patch or a probed square, `max_sparse` for sparse noise, `max_budget` of the
  family's largest for a whole-image trigger; `scan.search_evidence`), and
  in proportion to its held-out success up to `full_success`: a trigger that flips a third of the images
  is weaker evidence than one that flips two thirds, though both needed small masks (a sparse-noise QCB's
  target, 67 %, against a neighbour at 33 % that the disagreements piled onto, in the scan campaign).
  A trigger that carries to far more held-out images than any other class's counts too, whatever its effort
  relative to the others' (up to `carry_effort` times the cheap line): its class's carry index (how far its
  success stands above the median class's, `carry_index`) over `min_carry`; the larger of the two counts.
  The best family counts, and names the trigger family found.
- **disagreement** (the class most disagreements go to): how far their share stands above an even spread,
  0 when even and 1 when all go to one class, times `disagreement_weight`; a planted trigger leaks onto its
  target on clean images, rounding noise spreads.
- **drift** (every class alike): how far the most concentrated layer's worst channel stands above its
  median channel, log(concentration / `drift_base`) clipped to [0, 1], times `drift_weight`; it says
  something moved a few neurons, not towards which class, so it only adds to class evidence.

The score of a class is the sum; the pair is suspicious when the best class's score reaches `min_score`.
With the default weights neither disagreement nor drift (0.5 + 0.25) can flag a pair alone; a search
anomaly at `min_anomaly` can, as the patch rule did alone before. The settings live in `ScanConfig`; they
are set by hand from that rule, and experiments/scan_campaign.py measures them (TPR / FPR) and picks the line
on a calibration split of its pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qcbdefense.scanner.drift import Disagreement, LayerDrift
from qcbdefense.scanner.robust import robust_z
from qcbdefense.scanner.trigger_search import anomaly_index

if TYPE_CHECKING:  # scan.py holds the settings and calls this module
    from qcbdefense.scanner.scan import ScanConfig


@dataclass
class Verdict:
    suspicious: bool
    score: float  # the best class's score
    best_class: int  # the class with the highest score (the suspected target when suspicious)
    family: str | None  # the trigger family whose search found the best class (None: no search counted)
    signals: dict[str, float]  # the best class's score, signal by signal
    class_scores: list[dict[str, float]]  # per class: the search signal of each family, disagreement, total


def search_signals(efforts: list[float], successes: list[float], *, largest: float, cheap: float,
                   config: "ScanConfig", searched: list[bool] | None = None
                   ) -> tuple[list[float], list[float], list[float], list[float]]:
    """One family's per-class evidence from its efforts (mask pixels, or % of the largest budget) and held-out
    successes: the counted effort (`largest` when the trigger does not carry over to held-out images), its
    anomaly index, its carry index (`carry_index`), and the search signal (anomaly / `min_anomaly`, counted only
    when it carries over and the effort is at most `cheap`, scaled by the held-out success up to `full_success`;
    or carry / `min_carry` up to `carry_effort` x `cheap`, whichever is larger). Classes not `searched`
    (screened out: `scanner.screen`) count at `largest` with no anomaly, and the anomaly index of the others is
    measured among the searched classes alone."""
    searched = [True] * len(efforts) if searched is None else searched
    counted = [e if s >= config.min_success else largest for e, s in zip(efforts, successes)]
    among = iter(anomaly_index([e for e, done in zip(counted, searched) if done]))
    anomalies = [next(among) if done else 0.0 for done in searched]
    carries = carry_index(successes, searched, floor=config.carry_floor)
    signals = [max(max(a, 0.0) / config.min_anomaly * min(s / config.full_success, 1.0) if e <= cheap else 0.0,
                   max(k, 0.0) / config.min_carry if e <= config.carry_effort * cheap else 0.0)
               if s >= config.min_success else 0.0
               for a, k, e, s in zip(anomalies, carries, counted, successes)]
    return counted, anomalies, carries, signals


def carry_index(successes: list[float], searched: list[bool] | None = None, *, floor: float = 10.0) -> list[float]:
    """How far each class's held-out success (%) stands above the searched classes' median, in robust standard
    deviations (median absolute deviation) floored at `floor` points: large for the one class whose trigger
    carries to far more held-out images than any other's, whatever effort it needed (a PQBackdoor patch QCB's
    target: a 42-px mask, no smaller than the other classes', carrying to 71 % against at most 33 %). The floor
    keeps a few images' noise (one held-out image is 2 points) from counting. Unsearched classes get 0."""
    searched = [True] * len(successes) if searched is None else searched
    if not any(searched):
        return [0.0] * len(successes)
    among = iter(robust_z(torch.tensor([s for s, done in zip(successes, searched) if done]), floor).tolist())
    return [next(among) if done else 0.0 for done in searched]


def weigh_evidence(searches: dict[str, list[float]], disagree: Disagreement, layers: list[LayerDrift],
                   config: "ScanConfig") -> Verdict:
    """The scan's one decision: `searches` maps each trigger family to its per-class search signal
    (`search_signals`); the best class's summed score against `min_score`."""
    num_classes = len(disagree.counts)
    even = 1.0 / num_classes
    total = sum(disagree.counts)
    pile = (disagree.pile_share / 100.0 - even) / (1.0 - even) if total >= config.min_disagreements else 0.0
    concentration = max((layer.concentration for layer in layers), default=0.0)
    drift = config.drift_weight * min(max(math.log(max(concentration, 1e-9) / config.drift_base), 0.0), 1.0)
    scores = []
    for c in range(num_classes):
        row = {f"search_{family}": signal[c] for family, signal in searches.items()}
        row["disagreement"] = config.disagreement_weight * pile if c == disagree.pile_class else 0.0
        row["drift"] = drift
        row["total"] = max((signal[c] for signal in searches.values()), default=0.0) + row["disagreement"] + drift
        scores.append(row)
    best = max(range(num_classes), key=lambda c: scores[c]["total"])
    family_signal = {family: signal[best] for family, signal in searches.items()}
    family = max(family_signal, key=family_signal.get) if any(v > 0 for v in family_signal.values()) else None
    return Verdict(suspicious=scores[best]["total"] >= config.min_score, score=scores[best]["total"],
                   best_class=best, family=family, signals=dict(scores[best]), class_scores=scores)
