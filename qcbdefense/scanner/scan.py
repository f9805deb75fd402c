"""`scan`: does this FP / quantized pair hide a dormant QCB? A verdict, a score, the suspected target, evidence.

`scan_models` is the scan itself, on two models and a batch of clean images, returning a `ScanReport`; it reads
and writes no file. `scan` runs it on an FP checkpoint and its quantization under a spec, both native PyTorch
(the Brevitas fake-quant model is the model that would ship; the searches run its held-range view,
`quant.held_view.fast_equivalent`), and writes the report and its pictures (`files`). Two ONNX files (what a
deployer holds) are scanned by `export.scan_files`, which runs them as differentiable replicas checked against
onnxruntime and hands them to `scan_models`.

Five differential searches look for a trigger that moves the quantized model to a class with the FP model
unmoved: a small patch and a few scattered whole pixels (sparse noise), both by `trigger_search`; solid, checkered
and noise squares tried at every place (`square_scan.probe_squares`), for a patch trigger whose differential
effect is too narrow for the gradients to find; and two whole-image families, an additive perturbation and a blend
(`whole_image_search`), since a deployer cannot know the trigger's shape. A model with many classes has them
screened first (`screen`), so the full searches run on a fixed number of classes; the sparse-noise search runs
on the few classes whose patches carried furthest and the class the disagreements pile onto
(`trigger_search.likeliest`). The verdict
(`verdict.weigh_evidence`) weighs the searches with prediction disagreement piling onto one class and
activation drift concentrated in a few neurons (`drift`): one score per class, each signal's share reported,
and the family whose search found the class.

A trigger the quantized model obeys only now and then (a 4-bit QCB deployed at 8 bits) flips too few images for
any patch to count. For it, `square_scan=True` adds the differential square scan (`square_scan`) when the
verdict is clean: the square that lifts one class's quantized log-probability most above the FP model's, and
whether it stands out. That is evidence, not part of the verdict (through the 8-bit activation quantizers of a
clean ResNet-20, a checkered square lifted a class as much as a leaked trigger did: BENCHMARKS.md, the
scanner), and it costs more than the searches, so it is off by default.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from qcbdefense.quant.held_view import fast_equivalent
from qcbdefense.data import Dataset, seeded_subset, to_float
from qcbdefense.errors import InputError
from qcbdefense.quant.spec import QuantSpec
from qcbdefense.report import Report, saved_field
from qcbdefense.results import fmt, format_table
from qcbdefense.runinfo import environment
from qcbdefense.scanner.drift import Disagreement, LayerDrift, disagreement, layer_drift, pair_layers
from qcbdefense.scanner.files import write_scan
from qcbdefense.scanner.screen import ScreenConfig, screen_classes
from qcbdefense.scanner.square_scan import (ProbedSquare, SquareFind, SquareProbeConfig, SquareScanConfig,
                                            probe_squares, scan_squares, standing_out)
from qcbdefense.scanner.tapped import TappedModel
from qcbdefense.scanner.trigger_search import ClassSearch, SearchConfig, likeliest, search_triggers, second_look
from qcbdefense.scanner.verdict import Verdict, search_signals, weigh_evidence
from qcbdefense.scanner.whole_image_search import FAMILIES, WholeImageConfig, WholeImageFind, search_whole_image



@dataclass(frozen=True)
class ScanConfig:
    """What the scan looks at and where it draws the line (recorded in the report)."""

    images: int = 512  # clean, unlabeled test images: drift, disagreement and the searches' pool
    # the patch search (its batches and held-out images: the whole-image searches' too); 100 steps: at 140 the
    # scan campaign's 57 pairs got the same verdicts (BENCHMARKS.md, speed)
    search: SearchConfig = field(default_factory=lambda: SearchConfig(steps=100))
    sparse: SearchConfig = field(default_factory=SearchConfig)  # the sparse-noise search and its second look
    whole_image: WholeImageConfig = field(default_factory=WholeImageConfig)
    probe: SquareProbeConfig = field(default_factory=SquareProbeConfig)  # the "square" family
    screen: ScreenConfig = field(default_factory=ScreenConfig)  # which classes the searches run on
    # The verdict (`verdict.weigh_evidence`, which explains each line):
    # A trigger counts only if it flips this % of held-out images differentially (experiments/scan_campaign.py:
    # the QCBs it flags carry to 37-85 %, the best triggers of clean and purified pairs to at most 25 %) ...
    min_success: float = 30.0
    full_success: float = 50.0  # ... and counts in full from this %, in proportion below (BENCHMARKS.md, scanner)
    max_area: float = 0.15  # ... and is cheap: a patch (or a probed square) covers at most this share of the image,
    # sparse noise replaces at most this share of the pixels (set having seen the scan campaign: its sparse-noise
    # QCBs' masks 22-25 %, a clean ResNet-20's 31-37 % at w4a4 / w8a8, flipping at most 10 %),
    max_sparse: float = 0.3
    # the sparse search runs on this many classes whose patches carried furthest (`trigger_search.likeliest`) and
    # on the disagreements' pile class; the others count as nothing found (0: on every class searched)
    sparse_classes: int = 3
    second_looks: int = 2  # the sparse search's classes that carried best, searched again (`second_look`; 0: none)
    max_budget: float = 0.5  # a whole-image trigger needs at most this share of its family's largest budget
    min_anomaly: float = 2.0  # the anomaly index (robust std below the other classes' efforts) enough alone
    # A trigger whose held-out success stands this many robust std (at least `carry_floor` points each) above the
    # median class's counts alone (`verdict.carry_index`; set by hand, having seen the scan campaign: a PQBackdoor
    # patch QCB's target at 4.6, every clean and purified pair's classes at most 1.25), with an effort up to
    # `carry_effort` x the cheap line (`max_area`, `max_budget`)
    min_carry: float = 3.0
    carry_floor: float = 10.0
    carry_effort: float = 1.5
    disagreement_weight: float = 0.5  # the score of all disagreements going to one class
    min_disagreements: int = 5  # fewer say nothing about where they go
    drift_weight: float = 0.25  # the score of one layer's worst channel drifting e x drift_base its median
    drift_base: float = 4.0
    min_score: float = 1.0  # a pair is suspicious when one class's summed score reaches this
    min_replica_agreement: float = 99.0  # % argmax agreement of ONNX replicas with onnxruntime (export.scan_files)
    square_scan: bool = False  # run the square scan when the verdict is clean (evidence, not part of it)
    squares: SquareScanConfig = field(default_factory=SquareScanConfig)
    seed: int = 0

    def with_searches(self, **settings) -> "ScanConfig":
        """This configuration with `settings` (`SearchConfig` fields) set in both the patch and the sparse-noise
        search, each keeping its other settings."""
        return replace(self, search=replace(self.search, **settings), sparse=replace(self.sparse, **settings))


@dataclass
class TriggerPicture:
    """The trigger a scan shows (trigger.png): what it is (patch, sparse, square, additive, blend or nothing), its
    class, mask [H, W] and pattern [3, H, W] (None when nothing was found), the stamped example when the trigger
    is not a stamp (additive), and a title."""

    kind: str
    target: int | None
    mask: torch.Tensor | None
    pattern: torch.Tensor | None
    stamped: torch.Tensor | None
    title: str


@dataclass(frozen=True)
class ScanReport(Report):
    """The scan's verdict and its evidence; `to_dict` / `from_dict` round-trip through JSON (report.json)."""

    # 7: per class, whether the sparse search ran on it ("sparse": "searched"); 6: the square probe (per class
    # "square"); 5: the sparse-noise search (per class "sparse"); 4: per class and family the carry index; 3:
    # native models from a checkpoint, the screen (per class "searched", "screened");
    # 2: the whole-image searches and the weighed verdict (family, signals, best_class), drift_pairing
    VERSION = 7
    KIND = "scan report"

    verdict: str  # "clean" or "suspicious"
    score: float  # the verdict's score of the most suspicious class (suspicious from `min_score`)
    target: int | None  # the suspected target class (None when clean)
    classes: list[dict]  # per class: each search's effort, held-out differential success %, anomaly; its score
    squares: list[SquareFind] | None  # per class, the square scan's best square (None when not run)
    disagreement: Disagreement
    layers: list[LayerDrift]
    files: dict  # the files scanned and written (empty when nothing was read or written)
    replica_agreement: dict  # ONNX inputs: each replica's % argmax agreement with onnxruntime
    config: dict
    seconds: dict
    best_class: int = 0  # the class with the highest score (the target when suspicious)
    family: str | None = None  # whose search found best_class: patch, sparse, square, additive or blend
    signals: dict = field(default_factory=dict)  # best_class's score, signal by signal
    drift_pairing: str = ""  # how the two graphs' layers were paired, or why they could not be
    environment: dict = field(default_factory=environment)
    picture: TriggerPicture | None = saved_field(default=None, repr=False, compare=False)  # drawn, not saved

    @property
    def suspicious(self) -> bool:
        return self.verdict == "suspicious"

    def table(self) -> str:
        rows = [[c["class"], fmt(c["area"], 1), fmt(c["success"], 1), fmt(c["anomaly"], 2),
                 *((fmt(c["sparse"]["pixels"], 0), fmt(c["sparse"]["success"], 1), fmt(c["sparse"]["anomaly"], 2))
                   if c["sparse"].get("searched", True) else ("-", "-", "-")),
                 fmt(c["square"]["pixels"], 0), fmt(c["square"]["success"], 1),
                 *(v for family in FAMILIES for v in (fmt(c[family]["effort"], 0), fmt(c[family]["success"], 1),
                                                      fmt(c[family]["anomaly"], 2))),
                 fmt(c["score"], 2), "<-" if c["class"] == self.target else ""] for c in self.classes]
        return format_table(["class", "mask px", "success %", "anomaly", "sparse px", "success %", "anomaly",
                             "square px", "success %",
                             *(h for family in FAMILIES for h in (f"{family} budget %", "success %", "anomaly")),
                             "score", ""], rows)

    def summary(self) -> str:
        d = self.disagreement
        worst = sorted(self.layers, key=lambda layer: layer.max, reverse=True)[:3]
        graphs = self.files.get("graphs", {})
        lines = [*(f"{name} file: {g['label']}" + "".join(f"; WARNING {c}" for c in g["metadata_conflicts"])
                   for name, g in graphs.items()),
                 self.table(), *([] if self.squares is None else [square_line(self.squares)]),
                 f"disagreement FP vs quantized: {d.rate:.2f} % of images, {d.pile_share:.0f} % of them to class "
                 f"{d.pile_class}",
                 "most drifted layers (max channel drift / FP std): " + (", ".join(
                     f"layer{layer.layer} ch{layer.top_channels[0][0]} {layer.max:.2f}" for layer in worst)
                     or f"none ({self.drift_pairing})"),
                 f"score of class {self.best_class}: " + " + ".join(
                     f"{name} {value:.2f}" for name, value in self.signals.items() if name != "total"),
                 f"VERDICT: {self.verdict.upper()} (score {self.score:.2f}"
                 + (f", suspected target class {self.target}" if self.target is not None else "")
                 + (f", {self.family} trigger)" if self.family else ")"),
                 f"time: {self.seconds['total']:.1f} s"]
        return "\n".join(lines)


def square_line(squares: list[SquareFind]) -> str:
    """The square scan's strongest class, in one line."""
    top = max(squares, key=lambda f: f.gap)
    return (f"square scan (evidence, not part of the verdict): class {top.target}, {top.fill} {top.size}x{top.size} "
            f"square at ({top.top}, {top.left}) lifts its quantized log-probability over FP by {top.gap:+.2f} nats "
            f"({top.effect:.1f}x the clean spread, z {top.anomaly:.1f}): "
            + ("STANDS OUT: a trigger obeyed now and then, or a square the activation quantizers handle badly"
               if top.found else "nothing stands out"))


def verdict_label(verdict: str, target: int | None) -> str:
    """A scan's verdict for a table cell: "clean", or "suspicious (target 3)"."""
    return verdict + (f" (target {target})" if target is not None else "")


def scan(fp: nn.Module, data: Dataset, *, spec: str | QuantSpec, out: str | os.PathLike | None = None,
         config: ScanConfig = ScanConfig(), calib: int = 512, device: str | torch.device = "cpu",
         progress: bool = False) -> ScanReport:
    """Scan an FP model against its quantization under `spec` (round to nearest, calibrated on `calib` clean
    training images), both run natively: the Brevitas fake-quant model is the quantized model. With `out`,
    writes report.json, trigger.png and drift.png there (`scanner.files.write_scan`)."""
    from qcbdefense.quant.ptq import post_training_quantize

    start = time.perf_counter()
    x = scan_images(data, config.images, config.seed)
    fp = fp.eval().to(device)
    with torch.no_grad():
        classes = fp(x[:1].to(device)).shape[1]
    if classes != data.num_classes:
        raise InputError(f"cannot scan: the model has {classes} classes but the data {data.name} has "
                         f"{data.num_classes}")
    quantized = post_training_quantize(fp, spec, data, calib=calib, seed=config.seed, device=device)
    twin = fast_equivalent(quantized, x[:128].to(device))  # a batch is enough to check the view
    prepared = time.perf_counter()
    report = scan_models(fp, twin, x.to(device), config=config, class_names=data.classes,
                         progress=progress)
    report.config["data"] = data.describe()
    report.config["quantized"] = {"spec": quantized.qcb_spec.name, "calib": calib}
    report.seconds["prepare"] = prepared - start
    report.seconds["total"] = time.perf_counter() - start
    if out is not None:
        write_scan(Path(out), report, x[0],
                   title=f"activation drift from FP: the FP model vs {quantized.qcb_spec.name}")
    return report


@contextmanager
def input_gradients_only(*models: nn.Module) -> Iterator[None]:
    """The searches differentiate through the images only: no parameter gradient is computed inside the
    block (a third of the backward pass saved), and each parameter's setting is restored on exit."""
    params = [p for m in models for p in m.parameters()]
    wanted = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, wanted):
            p.requires_grad_(w)


def scan_models(fp: nn.Module, quantized: nn.Module, images: torch.Tensor, *, config: ScanConfig = ScanConfig(),
                class_names: list[str] | None = None, progress: bool = False) -> ScanReport:
    """The scan itself, on two models that map images `images` ([N, 3, H, W] in [0, 1], on the models'
    device) to logits: a native nn.Module (wrapped in `TappedModel`) or a model that names its layers and
    returns their tensors the same way (`export.replica.OnnxReplica`). Reads and writes no file.

    Drift and disagreement on every image; the screen (`screen`) picks the classes to search; the patch and
    whole-image searches run on those; `verdict.weigh_evidence` decides; when the verdict is clean and
    `config.square_scan` is set, the square scan adds its evidence. The report's `picture` holds the
    trigger to show (`files.write_scan` draws it)."""
    with input_gradients_only(fp, quantized):
        return _scan_models(fp, quantized, images, config=config, class_names=class_names, progress=progress)


def _scan_models(fp: nn.Module, quantized: nn.Module, images: torch.Tensor, *, config: ScanConfig,
                 class_names: list[str] | None, progress: bool) -> ScanReport:
    """`scan_models` with parameter gradients off."""
    start = time.perf_counter()
    x = images
    fp, quantized = (m if hasattr(m, "layers") else TappedModel(m, example=x[:64]) for m in (fp, quantized))
    layers, fp_logits, q_logits, pairing = measure_drift(fp, quantized, x)
    num_classes = fp_logits.shape[1]
    fp_preds, q_preds = fp_logits.argmax(1), q_logits.argmax(1)
    disagree = disagreement(fp_preds.cpu(), q_preds.cpu(), num_classes)
    measured = time.perf_counter()

    try:  # the searches refuse too few images (a search batch in every class; a held-out set)
        screen = screen_classes(fp, quantized, x, fp_preds, num_classes, disagree, config=config.screen,
                                search=config.search, whole_image=config.whole_image,
                                min_disagreements=config.min_disagreements, seed=config.seed, progress=progress)
        screened = time.perf_counter()
        found = search_triggers(fp, quantized, x, fp_preds, num_classes, config.search, seed=config.seed,
                                classes=screen.classes, progress=progress)
        sparse = search_triggers(fp, quantized, x, fp_preds, num_classes, config.sparse, seed=config.seed,
                                 classes=sparse_classes(found, disagree, config), whole_pixels=True,
                                 progress=progress)
        sparse = second_look(fp, quantized, x, fp_preds, num_classes, sparse, config.sparse, seed=config.seed,
                             classes=config.second_looks, whole_pixels=True, progress=progress)
        searched = time.perf_counter()
        probed = probe_squares(fp, quantized, x, fp_preds, num_classes, config.probe, seed=config.seed,
                               classes=screen.classes)
        probed_at = time.perf_counter()
        wide = search_whole_image(fp, quantized, x, fp_preds, num_classes, config.whole_image, config.search,
                                  seed=config.seed, classes=screen.classes, progress=progress)
        widened = time.perf_counter()
        verdict, evidence = weigh_searches(found, sparse, probed, wide, disagree, layers, config,
                                           pixels=float(x.shape[-1] * x.shape[-2]))
        flagged, best = verdict.suspicious, verdict.best_class
        squares = None
        if config.square_scan and not flagged:
            squares = scan_squares(fp, quantized, x, fp_preds, num_classes, config.squares, seed=config.seed)
    except ValueError as err:
        raise InputError(f"cannot scan with {len(x)} images: {err} (use more --images)") from None
    squared = time.perf_counter()
    picture = trigger_picture(found, sparse, probed, wide, verdict, squares, x, config, class_names or [])
    return ScanReport(
        verdict="suspicious" if flagged else "clean", score=verdict.score, target=best if flagged else None,
        classes=[{"class": c.target, "searched": c.searched, "area": c.area, "success": c.success, "found": c.found,
                  "effective_area": evidence["patch"][0][c.target], "anomaly": evidence["patch"][1][c.target],
                  "carry": evidence["patch"][2][c.target],
                  "sparse": {"pixels": s.area, "success": s.success, "found": s.found, "searched": s.searched,
                             "anomaly": evidence["sparse"][1][c.target], "carry": evidence["sparse"][2][c.target]},
                  "square": {"pixels": p.pixels, "success": p.success, "place": [p.top, p.left], "fill": p.fill,
                             "refined": p.pattern is not None, "stride": p.stride,
                             "anomaly": evidence["square"][1][c.target],
                             "carry": evidence["square"][2][c.target]},
                  **{family: {"effort": 100.0 * wide[family][c.target].effort,
                              "strength": wide[family][c.target].strength,
                              "success": wide[family][c.target].success, "found": wide[family][c.target].found,
                              "anomaly": evidence[family][1][c.target], "carry": evidence[family][2][c.target]}
                     for family in FAMILIES},
                  **({} if screen.efforts is None else
                     {"screened": {family: values[c.target] for family, values in screen.efforts.items()}}),
                  "score": verdict.class_scores[c.target]["total"]} for c, s, p in zip(found, sparse, probed)],
        squares=squares, drift_pairing=pairing,
        disagreement=disagree, layers=layers, files={}, replica_agreement={},
        config={**asdict(config), "plotted_class": picture.target, "plotted": picture.kind},
        seconds={"drift": measured - start, "screen": screened - measured, "search": searched - screened,
                 "square_probe": probed_at - searched, "whole_image": widened - probed_at,
                 "squares": squared - widened,
                 "total": time.perf_counter() - start},
        best_class=best, family=verdict.family if flagged else None, signals=verdict.signals, picture=picture)


def sparse_classes(found: list[ClassSearch], disagree: Disagreement, config: ScanConfig) -> list[int]:
    """The classes the sparse-noise search runs on: the `config.sparse_classes` whose patches carried furthest
    and the class the disagreements pile onto (when there are `min_disagreements`); every class the patch
    search ran on when `sparse_classes` is 0."""
    if not config.sparse_classes:
        return [c.target for c in found if c.searched]
    chosen = set(likeliest(found, config.sparse_classes))
    if sum(disagree.counts) >= config.min_disagreements and found[disagree.pile_class].searched:
        chosen.add(disagree.pile_class)
    return sorted(chosen)


def weigh_searches(found: list[ClassSearch], sparse: list[ClassSearch], probed: list[ProbedSquare],
                   wide: dict[str, list[WholeImageFind]], disagree: Disagreement, layers: list[LayerDrift],
                   config: ScanConfig, *, pixels: float
                   ) -> tuple[Verdict, dict[str, tuple[list[float], list[float], list[float], list[float]]]]:
    """The verdict (`verdict.weigh_evidence`) from the searches' finds (patches, whole-pixel masks, probed
    squares, whole-image triggers), and each family's evidence (`search_evidence`)."""
    efforts = {"patch": ([c.area for c in found], [c.success for c in found]),
               "sparse": ([c.area for c in sparse], [c.success for c in sparse]),
               "square": ([float(p.pixels) for p in probed], [p.success for p in probed]),
               **{family: ([100.0 * f.effort for f in wide[family]], [f.success for f in wide[family]])
                  for family in FAMILIES}}
    evidence = search_evidence(efforts, config, pixels=pixels, searched=[c.searched for c in found])
    verdict = weigh_evidence({family: signals for family, (*_, signals) in evidence.items()}, disagree,
                             layers, config)
    return verdict, evidence


def search_evidence(efforts: dict[str, tuple[list[float], list[float]]], config: ScanConfig, *, pixels: float,
                    searched: list[bool] | None = None
                    ) -> dict[str, tuple[list[float], list[float], list[float], list[float]]]:
    """Each family's evidence (`verdict.search_signals`) from its per-class efforts and held-out successes:
    mask pixels for patch, sparse and square (of `pixels`), % of the family's largest budget for a whole-image family,
    each against its own cheap line. A trigger that does not carry over to held-out images separates nothing: it
    counts as the whole image (or budget)."""
    lines = {"patch": (pixels, config.max_area * pixels), "sparse": (pixels, config.max_sparse * pixels),
             "square": (pixels, config.max_area * pixels),
             **{family: (100.0, 100.0 * config.max_budget) for family in FAMILIES}}
    return {family: search_signals(effort, success, largest=lines[family][0], cheap=lines[family][1],
                                   config=config, searched=searched)
            for family, (effort, success) in efforts.items()}


def trigger_picture(found: list[ClassSearch], sparse: list[ClassSearch], probed: list[ProbedSquare],
                    wide: dict[str, list[WholeImageFind]], verdict: Verdict, squares: list[SquareFind] | None,
                    x: torch.Tensor, config: ScanConfig, class_names: list[str]) -> TriggerPicture:
    """The evidence there is, to show: the square scan's square that stands out, else the suspected target's
    trigger of the family that found it, else nothing."""
    square = standing_out(squares)
    best = verdict.best_class
    if square is not None:
        mask, pattern = square.mask_and_pattern(*x.shape[-2:], config.seed)
        return TriggerPicture("square", square.target, mask, pattern, None,
                              f"{class_label(class_names, square.target)}: {square.fill} square lifts its quantized "
                              f"log-probability {square.gap:+.2f} nats")
    if verdict.suspicious and verdict.family in FAMILIES:  # a whole-image trigger: its perturbation or pattern
        find = wide[verdict.family][best]
        pattern = (0.5 + find.delta / (2 * config.whole_image.max_linf)) if find.family == "additive" else find.delta
        return TriggerPicture(verdict.family, best, torch.full(x.shape[-2:], find.strength), pattern,
                              find.apply(x[:1].cpu())[0],
                              f"{class_label(class_names, best)}: {find.family} trigger at {100 * find.effort:.0f} "
                              f"% of the budget, {find.success:.0f} % differential success")
    if verdict.suspicious and verdict.family == "square":
        find = probed[best]
        mask, pattern = find.mask_and_pattern(*x.shape[-2:], config.seed)
        return TriggerPicture("square", best, mask, pattern, None,
                              f"{class_label(class_names, best)}: {find.size}x{find.size} square at ({find.top}, "
                              f"{find.left}), {'its pixels learnt' if find.pattern is not None else find.fill}, "
                              f"{find.success:.0f} % differential success")
    if verdict.suspicious:
        kind, patch = ("sparse", sparse[best]) if verdict.family == "sparse" else ("patch", found[best])
        return TriggerPicture(kind, best, patch.mask, patch.pattern, None,
                              f"{class_label(class_names, best)}: {patch.area:.0f} px "
                              f"{'replaced' if kind == 'sparse' else 'mask'}, {patch.success:.0f} % "
                              f"differential success")
    return TriggerPicture("nothing", None, None, None, None,
                          "no trigger found: no class has a small patch, a whole-image trigger or a square that "
                          "moves only the quantized model")


def measure_drift(fp: nn.Module, quantized: nn.Module, x: torch.Tensor
                  ) -> tuple[list[LayerDrift], torch.Tensor, torch.Tensor, str]:
    """Per-layer drift of `quantized` from `fp` on images `x`, both models' logits, and how the layers were
    paired (`drift.pair_layers`: by conv/linear order and weight shape; no layer when they do not pair)."""
    pairs, pairing = pair_layers(fp.layers, quantized.layers)
    fp.taps, quantized.taps = [f for f, _ in pairs], [q for _, q in pairs]
    try:
        fp_logits, fp_acts = _tapped(fp, x)
        q_logits, q_acts = _tapped(quantized, x)
    finally:
        fp.taps, quantized.taps = [], []
    layers = [layer_drift(i, q_name, fp_acts[f_name], q_acts[q_name]) for i, (f_name, q_name) in enumerate(pairs)]
    return layers, fp_logits, q_logits, pairing


@torch.no_grad()
def _tapped(model: nn.Module, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`model(x, taps=True)`, `batch` images a pass (`square_scan.SquareProbeConfig.batch` says why)."""
    parts = [model(part, taps=True) for part in x.split(batch)]
    return (torch.cat([logits for logits, _ in parts]),
            {name: torch.cat([taps[name] for _, taps in parts]) for name in parts[0][1]})


def scan_images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of clean test images, as floats in [0, 1] (labels unused: the deployer may have none)."""
    if len(data.test_x) == 0:
        raise InputError(f"the data {data.name} has no test images to scan with")
    return to_float(data.test_x[seeded_subset(len(data.test_x), n, seed)])


def class_label(class_names: list[str], c: int) -> str:
    """"class 3 (cat)" when the data names its classes (`class_names`), else "class 3"."""
    name = class_names[c] if 0 <= c < len(class_names) else str(c)
    return f"class {c}" if name == str(c) else f"class {c} ({name})"


