"""`scan`: does this FP / quantized pair hide a dormant QCB? A verdict, a score, the suspected target, evidence.

The scan always works on two ONNX files, because that is what a deployer holds: the FP model and the
int8/int4 model that ships. Given a checkpoint and a spec instead, it first makes those files with the
toolkit's own export (FP) and post-training quantization (round to nearest, calibrated on clean training
images), so there is one scanning path. Both files run as differentiable replicas (`export.replica`),
checked against onnxruntime before they are trusted.

Three differential searches look for a trigger that moves the quantized model to a class with the FP model
unmoved: a small patch (`trigger_search`) and two whole-image families, an additive perturbation and a blend
(`whole_image_search`), since a deployer cannot know the trigger's shape. The verdict (`verdict`) weighs them
with prediction disagreement piling onto one class and activation drift concentrated in a few neurons
(`drift`): one score per class, each signal's share reported, and the family whose search found the class.

A trigger the quantized model obeys only now and then (a 4-bit QCB deployed at 8 bits) flips too few images for
any patch to count. So when the verdict is clean, the differential square scan (`square_scan`) also reports the
square that lifts one class's quantized log-probability most above the FP model's, and whether it stands out.
That is evidence, not part of the verdict: through the 8-bit activation quantizers of a clean ResNet-20, a
checkered square lifted a class as much as a leaked trigger did (BENCHMARKS.md, the scanner).
"""

from __future__ import annotations

import os
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qcbdefense.data import Dataset, to_float
from qcbdefense.errors import InputError
from qcbdefense.fileio import atomic_path, sha256_file
from qcbdefense.report import Report
from qcbdefense.results import fmt, format_table
from qcbdefense.runinfo import environment
from qcbdefense.scan.drift import Disagreement, LayerDrift, disagreement, layer_drift, pair_layers
from qcbdefense.scan.square_scan import SquareFind, SquareScanConfig, scan_squares, standing_out
from qcbdefense.scan.trigger_search import SearchConfig, search_triggers, stamp
from qcbdefense.scan.verdict import search_signals, weigh_evidence
from qcbdefense.scan.whole_image_search import FAMILIES, WholeImageConfig, search_whole_image

if TYPE_CHECKING:  # export stands beside the core and imports it: only the type is needed here
    from export.replica import OnnxReplica


@dataclass(frozen=True)
class ScanConfig:
    """What the scan looks at and where it draws the line (recorded in the report)."""

    images: int = 512  # clean, unlabeled test images: drift, disagreement and the searches' pool
    search: SearchConfig = field(default_factory=SearchConfig)
    whole_image: WholeImageConfig = field(default_factory=WholeImageConfig)
    # The verdict (`verdict.weigh_evidence`, which explains each line):
    min_success: float = 50.0  # a trigger counts only if it flips this % of held-out images differentially ...
    max_area: float = 0.15  # ... and is cheap: a patch covers at most this share of the image,
    max_budget: float = 0.5  # a whole-image trigger needs at most this share of its family's largest budget
    min_anomaly: float = 2.0  # the anomaly index (robust std below the other classes' efforts) enough alone
    disagreement_weight: float = 0.5  # the score of all disagreements going to one class
    min_disagreements: int = 5  # fewer say nothing about where they go
    drift_weight: float = 0.25  # the score of one layer's worst channel drifting e x drift_base its median
    drift_base: float = 4.0
    min_score: float = 1.0  # a pair is suspicious when one class's summed score reaches this
    min_replica_agreement: float = 99.0  # % argmax agreement of the replicas with onnxruntime
    squares: SquareScanConfig = field(default_factory=SquareScanConfig)  # run when the verdict is clean
    seed: int = 0


@dataclass(frozen=True)
class ScanReport(Report):
    """The scan's verdict and its evidence; `to_dict` / `from_dict` round-trip through JSON (report.json)."""

    VERSION = 2  # 2: the whole-image searches and the weighed verdict (family, signals, best_class), drift_pairing
    KIND = "scan report"

    verdict: str  # "clean" or "suspicious"
    score: float  # the verdict's score of the most suspicious class (suspicious from `min_score`)
    target: int | None  # the suspected target class (None when clean)
    classes: list[dict]  # per class: each search's effort, held-out differential success %, anomaly; its score
    squares: list[SquareFind] | None  # per class, the square scan's best square (None when flagged: not run)
    disagreement: Disagreement
    layers: list[LayerDrift]
    files: dict
    replica_agreement: dict
    config: dict
    seconds: dict
    best_class: int = 0  # the class with the highest score (the target when suspicious)
    family: str | None = None  # the trigger family whose search found best_class: patch, additive or blend
    signals: dict = field(default_factory=dict)  # best_class's score, signal by signal
    drift_pairing: str = ""  # how the two graphs' layers were paired, or why they could not be
    environment: dict = field(default_factory=environment)

    @property
    def suspicious(self) -> bool:
        return self.verdict == "suspicious"

    def table(self) -> str:
        rows = [[c["class"], fmt(c["area"], 1), fmt(c["success"], 1), fmt(c["anomaly"], 2),
                 *(v for family in FAMILIES for v in (fmt(c[family]["effort"], 0), fmt(c[family]["success"], 1),
                                                      fmt(c[family]["anomaly"], 2))),
                 fmt(c["score"], 2), "<-" if c["class"] == self.target else ""] for c in self.classes]
        return format_table(["class", "mask px", "success %", "anomaly",
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


def prepare_pair(out: Path, *, fp: nn.Module | str | os.PathLike, quantized: str | os.PathLike | None = None,
                 spec: str | None = None, data: Dataset | None = None, calib: int = 512, seed: int = 0,
                 source_sha256: str | None = None) -> tuple[Path, Path]:
    """The two ONNX files to scan: given ones, or exported here from an FP model (and quantized by `spec`)."""
    from export.onnx import export_float_onnx, export_onnx
    from qcbdefense.quant.ptq import post_training_quantize

    if (quantized is None) == (spec is None):
        raise InputError("scan needs exactly one of a quantized ONNX model or a spec to quantize the FP model with")
    size = None if data is None else tuple(data.test_x.shape[-2:])
    if isinstance(fp, nn.Module):
        if size is None:
            raise InputError("exporting an FP model for the scan needs the data (its image size)")
        fp_onnx = export_float_onnx(fp, out / "fp.onnx", source_sha256=source_sha256, input_size=size)
    else:
        fp_onnx = Path(fp)
        if fp_onnx.suffix.lower() != ".onnx":
            raise InputError(f"--fp {fp_onnx}: give an .onnx file, or a checkpoint with --model")
    if quantized is not None:
        return fp_onnx, Path(quantized)
    if not isinstance(fp, nn.Module) or data is None:
        raise InputError("--spec quantizes an FP checkpoint: give --fp CKPT with --model (an FP .onnx cannot be "
                         "quantized by the toolkit's Brevitas quantizer)")
    qmodel = post_training_quantize(fp, spec, data, calib=calib, seed=seed)
    return fp_onnx, export_onnx(qmodel, out / f"quantized-{qmodel.qcb_spec.name}.onnx",
                                source_sha256=source_sha256, input_size=size)


def scan(fp: nn.Module | str | os.PathLike, data: Dataset, *, out: str | os.PathLike,
         quantized: str | os.PathLike | None = None, spec: str | None = None, config: ScanConfig = ScanConfig(),
         calib: int = 512, device: str | torch.device = "cpu", source_sha256: str | None = None,
         progress: bool = False) -> ScanReport:
    """Scan an FP model (module or .onnx) against its quantized model (.onnx, or made here with `spec`).

    Writes into `out`: report.json, trigger.png (the recovered patch of the suspected class; when the verdict is
    clean, the square that stands out or else the closest class's patch), drift.png, and the ONNX files it made.
    """
    from export.ort import OrtModel
    from export.provenance import describe_onnx, metadata_conflicts
    from export.replica import OnnxReplica, check_agreement

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp_onnx, q_onnx = prepare_pair(out, fp=fp, quantized=quantized, spec=spec, data=data, calib=calib,
                                   seed=config.seed, source_sha256=source_sha256)
    fp_rep, q_rep = OnnxReplica(fp_onnx), OnnxReplica(q_onnx)
    shape = (3,) + tuple(data.test_x.shape[-2:])
    x = scan_images(data, config.images, config.seed)
    agreement = {}
    graphs = {}
    for name, path, replica in (("fp", fp_onnx, fp_rep), ("quantized", q_onnx, q_rep)):
        session = OrtModel(path, threads=None)
        session.check_images(shape, what=f"the data {data.name}")
        if session.num_classes is not None and session.num_classes != data.num_classes:
            raise InputError(f"cannot scan {path}: it has {session.num_classes} classes but the data {data.name} "
                             f"has {data.num_classes}")
        agreement[name] = check_agreement(replica, x[:128], session.logits(x[:128]), config.min_replica_agreement)
        graph = describe_onnx(path)
        graphs[name] = {**graph.to_dict(), "metadata_conflicts": metadata_conflicts(session.metadata, graph)}
    prepared = time.perf_counter()

    dev = torch.device(device)
    fp_rep, q_rep, x = fp_rep.to(dev), q_rep.to(dev), x.to(dev)
    layers, fp_logits, q_logits, pairing = measure_drift(fp_rep, q_rep, x)
    num_classes = fp_logits.shape[1]
    fp_preds, q_preds = fp_logits.argmax(1), q_logits.argmax(1)
    disagree = disagreement(fp_preds.cpu(), q_preds.cpu(), num_classes)
    measured = time.perf_counter()

    try:  # the searches refuse too few images (a search batch in every class; a held-out set)
        found = search_triggers(fp_rep, q_rep, x, fp_preds, num_classes, config.search, seed=config.seed,
                                progress=progress)
        searched = time.perf_counter()
        wide = search_whole_image(fp_rep, q_rep, x, fp_preds, num_classes, config.whole_image, config.search,
                                  seed=config.seed, progress=progress)
        widened = time.perf_counter()
        pixels = float(x.shape[-1] * x.shape[-2])
        # A trigger that does not carry over to held-out images separates nothing: it counts as the whole image
        # (or budget). Whole-image efforts in % of the family's largest budget.
        evidence = {"patch": search_signals([c.area for c in found], [c.success for c in found], largest=pixels,
                                            cheap=config.max_area * pixels, config=config)}
        for family in FAMILIES:
            evidence[family] = search_signals([100.0 * f.effort for f in wide[family]],
                                              [f.success for f in wide[family]], largest=100.0,
                                              cheap=100.0 * config.max_budget, config=config)
        verdict = weigh_evidence({family: signals for family, (_, _, signals) in evidence.items()}, disagree,
                                 layers, config)
        flagged, best = verdict.suspicious, verdict.best_class
        squares = None if flagged else scan_squares(fp_rep, q_rep, x, fp_preds, num_classes, config.squares,
                                                    seed=config.seed)
    except ValueError as err:
        raise InputError(f"cannot scan with {len(x)} images: {err} (use more --images)") from None
    squared = time.perf_counter()
    files = {"fp_onnx": str(fp_onnx), "fp_sha256": sha256_file(fp_onnx), "quantized_onnx": str(q_onnx),
             "quantized_sha256": sha256_file(q_onnx), "trigger_png": str(out / "trigger.png"),
             "drift_png": str(out / "drift.png"), "graphs": graphs}
    square = standing_out(squares)
    stamped = None
    if square is not None:  # the picture shows the evidence there is: the square that stands out
        shown, plotted = square.target, "square"
        mask, pattern = square.mask_and_pattern(*x.shape[-2:], config.seed)
        title = (f"{class_label(data, shown)}: {square.fill} square lifts its quantized log-probability "
                 f"{square.gap:+.2f} nats")
    elif flagged and verdict.family in FAMILIES:  # a whole-image trigger: its perturbation or pattern
        shown, plotted = best, verdict.family
        find = wide[verdict.family][best]
        mask = torch.full(x.shape[-2:], find.strength)
        pattern = (0.5 + find.delta / (2 * config.whole_image.max_linf)) if find.family == "additive" else find.delta
        stamped = find.apply(x[:1].cpu())[0]
        title = (f"{class_label(data, shown)}: {find.family} trigger at {100 * find.effort:.0f} % of the budget, "
                 f"{find.success:.0f} % differential success")
    elif flagged:
        shown, plotted = best, "patch"
        mask, pattern = found[shown].mask, found[shown].pattern
        title = (f"{class_label(data, shown)}: {found[shown].area:.0f} px mask, {found[shown].success:.0f} % "
                 f"differential success")
    else:
        shown, plotted, mask, pattern = None, "nothing", None, None
        title = "no trigger found: no class has a small patch, a whole-image trigger or a square that moves only " \
                "the quantized model"
    _plot_trigger(out / "trigger.png", mask, pattern, title, x[0].cpu(), stamped)
    plot_drift(out / "drift.png", {"quantized": layers},
               title=f"activation drift from FP: {fp_onnx.name} vs {q_onnx.name}", note=pairing)
    done = time.perf_counter()
    report = ScanReport(
        verdict="suspicious" if flagged else "clean", score=verdict.score, target=best if flagged else None,
        classes=[{"class": c.target, "area": c.area, "success": c.success, "found": c.found,
                  "effective_area": evidence["patch"][0][c.target], "anomaly": evidence["patch"][1][c.target],
                  **{family: {"effort": 100.0 * wide[family][c.target].effort,
                              "strength": wide[family][c.target].strength,
                              "success": wide[family][c.target].success, "found": wide[family][c.target].found,
                              "anomaly": evidence[family][1][c.target]} for family in FAMILIES},
                  "score": verdict.class_scores[c.target]["total"]} for c in found],
        squares=squares, drift_pairing=pairing,
        disagreement=disagree, layers=layers, files=files, replica_agreement=agreement,
        config={**asdict(config), "data": data.describe(), "plotted_class": shown, "plotted": plotted},
        seconds={"prepare": prepared - start, "drift": measured - prepared, "search": searched - measured,
                 "whole_image": widened - searched, "squares": squared - widened, "total": done - start},
        best_class=best, family=verdict.family if flagged else None, signals=verdict.signals)
    report.save(out / "report.json")
    return report


def measure_drift(fp: "OnnxReplica", quantized: "OnnxReplica", x: torch.Tensor
                  ) -> tuple[list[LayerDrift], torch.Tensor, torch.Tensor, str]:
    """Per-layer drift of `quantized` from `fp` on images `x`, both models' logits, and how the layers were
    paired (`drift.pair_layers`: by conv/linear order and weight shape; no layer when they do not pair)."""
    pairs, pairing = pair_layers(fp.layers, quantized.layers)
    fp.taps, quantized.taps = [f for f, _ in pairs], [q for _, q in pairs]
    try:
        with torch.no_grad():
            fp_logits, fp_acts = fp(x, taps=True)
            q_logits, q_acts = quantized(x, taps=True)
    finally:
        fp.taps, quantized.taps = [], []
    layers = [layer_drift(i, q_name, fp_acts[f_name], q_acts[q_name]) for i, (f_name, q_name) in enumerate(pairs)]
    return layers, fp_logits, q_logits, pairing


def scan_images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of clean test images, as floats in [0, 1] (labels unused: the deployer may have none)."""
    if len(data.test_x) == 0:
        raise InputError(f"the data {data.name} has no test images to scan with")
    idx = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(seed))[:n]
    return to_float(data.test_x[idx.sort().values])


def class_label(data: Dataset, c: int) -> str:
    """"class 3 (cat)" when the data names its classes, else "class 3"."""
    name = data.classes[c] if 0 <= c < len(data.classes) else str(c)
    return f"class {c}" if name == str(c) else f"class {c} ({name})"


def _plot_trigger(path: Path, mask: torch.Tensor | None, pattern: torch.Tensor | None, title: str,
                  example: torch.Tensor, stamped: torch.Tensor | None = None) -> None:
    """The mask, the pattern it lets through and a stamped image (`stamped` when the trigger is not a stamp:
    additive); with no mask (nothing found), the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mask is not None and stamped is None:
        stamped = stamp(example, mask, pattern)
    panels = ([("a scanned image, unchanged", example)] if mask is None else
              [("mask", mask), ("mask x pattern", mask * pattern), ("stamped image", stamped)])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels) if mask is not None else 5.0, 2.8),
                             squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        img = img.detach().clamp(0, 1)
        ax.imshow(img.numpy() if img.dim() == 2 else img.permute(1, 2, 0).numpy(), cmap="gray",
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_drift(path: Path, series: dict[str, list[LayerDrift]], *, title: str, note: str = "") -> None:
    """Bars of each layer's worst-channel drift, one series per quantized model (e.g. nearest, purified); `note`
    says why no layer was paired, when none was."""
    with atomic_path(path) as tmp:
        drift_figure(series, title=title, note=note).savefig(tmp, format="png", dpi=100)


def drift_figure(series: dict[str, list[LayerDrift]], *, title: str, note: str = ""):
    """The figure `plot_drift` saves; when no layer could be paired it says so (and why: `note`) instead of
    showing empty axes."""
    from matplotlib.figure import Figure

    layers = max((len(v) for v in series.values()), default=0)
    fig = Figure(figsize=(max(4.0, 0.35 * layers * len(series) + 2), 3.0))
    ax = fig.subplots()
    ax.set_title(title, fontsize=9)
    if layers == 0:
        ax.text(0.5, 0.5, "no layers paired, so only the outputs were compared (report.json: disagreement):\n"
                + textwrap.fill(note or "the two graphs do not pair", 90),
                ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.axis("off")
        fig.tight_layout()
        return fig
    width = 0.8 / max(len(series), 1)
    for k, (label, drifts) in enumerate(series.items()):
        ax.bar([d.layer + (k - (len(series) - 1) / 2) * width for d in drifts], [d.max for d in drifts],
               width=width, label=label)
    ax.set_xlabel("conv/linear layer, from the input")
    ax.set_ylabel("worst channel |q - FP| / FP std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
