"""The `purify` verb: the defences registry, the report, and saving / loading a purified quantized model.

A defence is a registered `Defense`: an options dataclass (its keyword names are the CLI flags) and a
`run(ctx, options)` that purifies `ctx.qmodel` in place. `purify` does what every defence shares: copy the
user's model (it is never modified), quantize and calibrate the copy as the victim would (round-to-nearest,
activation ranges from the defender's clean images, `quant.ptq.post_training_quantize`), score FP and
nearest, run the defence, score the result.

What is saved (`save_purified`, read back by `load_purified`):
    DIR/purified.pt   the quantized model's state_dict: hardened float weights (= (q - z) * s exactly), BN,
                      Normalize, and every quantizer's state (weight scales / zero points, activation ranges)
    DIR/spec.json     the QuantSpec
    DIR/model.json    {"model": the model reference (models.reference)}, so that the folder alone rebuilds
                      the architecture, zoo or not (spec.json stays a plain QuantSpec, usable as --spec)
    DIR/report.json   the PurifyReport (CA/ASR/agreement of FP, nearest, purified; per-layer losses and
                      times; options, spec, seed, environment)
    DIR/manifest.json the sha256 of each file above, written last: it binds them into one set, so a run killed
                      midway in a reused folder cannot leave new weights beside an old spec that loads as one

Examples:
    >>> purified, report = purify(model, load_dataset("builtin"), method="lac", spec="w4a4")  # doctest: +SKIP
    >>> save_purified(purified, "out", report=report)                                      # doctest: +SKIP
    >>> same = load_purified(None, "out")  # the architecture recorded in out/model.json      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qcbdefense.data import Dataset, load_dataset, to_float
from qcbdefense.defenses.guide import with_found_triggers
from qcbdefense.errors import InputError, check_number
from qcbdefense.fileio import sha256_file, write_json
from qcbdefense.quant.calibrate import is_calibrated, widen_ranges
from qcbdefense.quant.equalize import equalize_activations
from qcbdefense.quant.ptq import calibration_images, post_training_quantize
from qcbdefense.quant.quantize import quantize, quantizer_parameters
from qcbdefense.quant.spec import QuantSpec, get_spec
from qcbdefense.registry import Registry, make_options
from qcbdefense.report import Report
from qcbdefense.results import format_table
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, agreement, evaluate, predict
from qcbdefense.triggers import Trigger, parse_trigger, trigger_from_dict

EQUALIZE_MODES = ("off", "on", "auto")
PURIFY_CALIB = 1024  # clean training images the defence calibrates on, unless told otherwise

WEIGHTS_FILE, SPEC_FILE, REPORT_FILE, MODEL_FILE, MANIFEST_FILE = ("purified.pt", "spec.json", "report.json",
                                                                   "model.json", "manifest.json")


@dataclass
class DefenseContext:
    """What a defence works on: the FP reference (never modified), the calibrated round-to-nearest model to
    purify in place (it shares its parameters with a private copy of the user's model, `work`), the defender's
    clean images (float [N, C, H, W] on the device), the dataset (defences that need labels draw their
    labelled share of its training split; the test split is for scoring only), and run settings.

    `data_used` says what data the defence used; purify records it in the report. It starts as the unlabeled
    images; a defence that uses more (labelled images) adds to it."""

    fp_model: nn.Module
    qmodel: nn.Module
    images: torch.Tensor
    seed: int
    device: torch.device
    progress: bool
    work: nn.Module | None = None
    data: Dataset | None = None
    data_used: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Defense:
    """A registered purifier: `run(ctx, options) -> (layer records, layers left at nearest)`."""

    name: str
    options: type
    run: Callable[[DefenseContext, Any], tuple[list, list[str]]]
    summary: str

    def make_options(self, options: Mapping[str, Any]):
        return make_options("method", self.name, self.options, options)

    def released_options(self) -> dict:
        """The authors' settings of this method: the `RELEASED` of every options class it is made of."""
        released: dict = {}
        for cls in reversed(self.options.__mro__):
            released.update(vars(cls).get("RELEASED", {}))
        return released


DEFENSES: Registry[Defense] = Registry("defense")


@dataclass
class StageRecord:
    """One stage of a defence that does not reconstruct layer by layer (fine-tuning the FP model, setting
    clipping ranges); the report's `layers` list holds these."""

    name: str
    steps: int
    seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "stage": True, "steps": self.steps, "seconds": self.seconds, **self.details}


@dataclass(frozen=True)
class PurifyReport(Report):
    """Everything one purification did and measured; `to_dict`/`from_dict` round-trip through JSON."""

    # 4: equalize, equalized; 3: act_headroom; 2: one Score per model (per-class accuracy, image counts); every key
    # required
    VERSION = 4
    KIND = "purify report"

    method: str
    arch: str
    spec: QuantSpec
    dataset: dict
    calib: int
    seed: int
    device: str
    options: dict
    trigger: dict | None
    target: int
    fp: Score | None
    nearest: Score | None
    purified: Score | None
    layers: list[dict]
    skipped_layers: list[str]
    seconds: dict
    peak_memory_mb: dict
    trigger_search: dict | None  # what `search_triggers` found (guide.GuidedImages.to_dict)
    data_used: dict  # what data the defence used (DefenseContext.data_used)
    act_headroom: float  # every activation range but the image's widened by this before the defence
    equalize: dict  # {"mode": off / on / auto}; auto: each candidate's % agreement with FP on calibration images
    equalized: dict  # per layer, the scales `quant.equalize` divided its output channels by (empty: not equalized)
    environment: dict = field(default_factory=environment)

    def table(self) -> str:
        rows = []
        models = [("FP", self.fp), ("nearest", self.nearest)]
        if self.method != "nearest":
            models.append((self.method, self.purified))
        for label, score in models:
            if score is not None:
                rows.append([label, score.ca, score.asr, score.ra, score.der, score.agreement])
        return format_table(["model", "CA %", "ASR %", "RA %", "DER %", "agree w/ FP %"], rows)

    def summary(self) -> str:
        lines = [f"{self.method} on {self.arch}, {self.spec.name} ({self.spec.label}), {self.calib} clean images,"
                 f" seed {self.seed}, {self.device}"]
        if self.fp is not None:
            lines.append(self.table())
        steps = sum(layer.get("steps", 0) for layer in self.layers)
        stages = [layer["name"] for layer in self.layers if layer.get("stage")]  # FP-model defences' stages
        done = f"stages {', '.join(stages)}" if stages else f"{len(self.layers)} layers reconstructed"
        lines.append(f"{done}, {steps} steps, defence "
                     f"{self.seconds.get('defense', 0.0):.1f} s, total {self.seconds.get('total', 0.0):.1f} s, "
                     f"peak RSS {self.peak_memory_mb.get('rss', 0.0):.0f} MB"
                     + (f", peak CUDA {self.peak_memory_mb['cuda']:.0f} MB" if self.peak_memory_mb.get("cuda")
                        else ""))
        tried = self.equalize.get("calib_agreement")
        if tried and not self.equalized:
            lines.append(f"activations not equalized: the equalized model agreed with FP on "
                         f"{tried['equalized']:.2f} % of the calibration images, the plain one on "
                         f"{tried['plain']:.2f} %")
        if self.equalized:
            scales = [s for layer in self.equalized.values() for s in layer if s != 1.0]
            lines.append(f"activations equalized before quantizing: {len(scales)} output channels of "
                         f"{len(self.equalized)} layers divided by {min(scales):.1f}-{max(scales):.1f} (the float "
                         f"model unchanged)" + (f"; agreement with FP on the calibration images "
                                                f"{tried['equalized']:.2f} % against {tried['plain']:.2f} % plain"
                                                if tried else ""))
        if self.act_headroom != 1.0:
            lines.append(f"activation ranges widened {self.act_headroom:g}x before the defence (all but the image's)")
        if self.data_used:
            lines.append("data used: " + ", ".join(f"{key} {value}" for key, value in self.data_used.items()))
        if self.trigger_search is not None:
            search, seconds = self.trigger_search, self.seconds.get("search", 0.0)
            stamped = search["stamped"]
            lines.append(f"trigger search ({seconds:.1f} s): " + (
                f"no patch carries over to held-out images; {_squares_line(search)}" if stamped is None else
                f"smallest patch class {stamped}, {search['classes'][stamped]['area']:.1f} px, "
                f"{search['classes'][stamped]['success']:.1f} % held-out success; {_refined_line(search)}"
                f"stamped on a copy of each calibration image"))
        if self.skipped_layers:
            lines.append(f"left at round-to-nearest (never called by the forward): {', '.join(self.skipped_layers)}")
        mismatched = [layer["name"] for layer in self.layers if layer.get("mismatches")]
        if mismatched:
            lines.append(f"WARNING: the plain quantizer does not reproduce the learned integers of "
                         f"{', '.join(mismatched)}")
        return "\n".join(lines)


def _squares_line(search: dict) -> str:
    """What the square scan found, for the summary."""
    squares = search["squares"]
    if squares is None:
        return "nothing added"
    top = max(squares["classes"], key=lambda find: find["gap"])
    best = (f"{top['fill']} {top['size']}x{top['size']} square at ({top['top']}, {top['left']}) raising class "
            f"{top['target']} by {top['gap']:.2f} nats (anomaly {top['anomaly']:.1f}, {top['effect']:.1f}x the "
            f"clean spread)")
    if squares["stamped"] is None:
        return f"the square scan's best, a {best}, does not stand out; nothing added"
    return f"the square scan found a {best}, stamped on a copy of each calibration image"


def _refined_line(search: dict) -> str:
    """How the stamped patch was refined, for the summary (None: no patch was refined)."""
    refined = search["refined"]
    if refined is None:
        return ""
    return (f"refined to a {refined['side']}x{refined['side']} square at ({refined['top']}, {refined['left']}) "
            f"flipping {refined['success']:.1f} % of calibration images against the patch's "
            f"{refined['patch_success']:.1f} % ({'square' if refined['used'] else 'patch'} kept); ")


def purify(model: nn.Module, data: Dataset | str, *, method: str = "lac-pda", spec: str | QuantSpec = "w4a4",
           calib: int = PURIFY_CALIB, trigger: Trigger | str | None = None, target: int = 0, seed: int = 0,
           device: str | torch.device = "cpu", arch: str = "model", evaluate_models: bool = True,
           search_triggers: bool = False, equalize: str = "off", act_headroom: float = 1.0, progress: bool = False,
           reference_scores: tuple[Score, Score] | None = None,
           **options: Any) -> tuple[nn.Module, PurifyReport]:
    """Purify the quantization of `model` under `spec` with `method`; return the purified QUANTIZED model.

    Args:
        model: the FP model (pixels in [0, 1] in, logits out). Never modified.
        data: a Dataset or a dataset spec string; the defender uses `calib` unlabeled training images, and
            the test split is only used to score the models.
        method: a name from `DEFENSES.names()`: nearest, lac, lac-pda, efrap, adaround.
        spec: the deployment quantizer (preset name, spec file or QuantSpec).
        trigger, target: for the ASR columns of the report only (the defence never sees them).
        evaluate_models: score FP, nearest and purified on the test split (False: report without scores).
        search_triggers: before the defence, search a differential patch per class between the FP and the
            round-to-nearest model (failing that, the square scan) and add stamped copies of the calibration
            images (`guide`, beyond the papers; any method but nearest).
        equalize: "on": after the round-to-nearest model is scored, scale channels whose range dwarfs the rest of
            their tensor down where they are written and up where they are read (`quant.equalize`: the float
            model's function unchanged) and quantize that model instead, so per-tensor ranges fit every channel;
            the FP model the defence reconstructs towards is the equalized one. "auto": the same only when the
            equalized model, quantized and widened, agrees with the FP model on more calibration images than the
            plain one (equalizing moves precision from weights to activations, which an attack that grew a few
            channels calls for and an ordinary model may not). "off": neither. Beyond the papers.
        act_headroom: after the round-to-nearest model is scored, widen each of its activation ranges but the
            image's by this factor (`quant.calibrate.widen_ranges`: a QCB can live in the clip of a range
            calibrated on clean images; beyond the papers). 1: the calibrated ranges.
        progress: a progress bar per layer.
        reference_scores: the FP and round-to-nearest models' scores (with their predictions) from a purify of
            the same model, data, spec, calib, seed, trigger and target (its report's `fp` and `nearest`):
            reused instead of measured again, as a bench does for every defence of one model.
        **options: the method's options (see its options dataclass, e.g. steps=10000, early_stop=False).

    Returns:
        The purified quantized model (eval mode, on `device`) and its PurifyReport.
    """
    defense = DEFENSES.get(method)
    opts = defense.make_options(options)
    spec = get_spec(spec)
    if isinstance(data, str):
        data = load_dataset(data)
    if isinstance(trigger, str):
        trigger = parse_trigger(trigger)
    check_number("calib", calib, integer=True, low=1, kind="a number of images")
    if not isinstance(model, nn.Module):
        raise InputError(f"purify needs an nn.Module, got {type(model).__name__}")
    if not isinstance(search_triggers, bool) or (search_triggers and method == "nearest"):
        raise InputError("search_triggers takes True or False, and needs a method that learns (not nearest)")
    check_number("act_headroom", act_headroom, low=1.0)
    if equalize not in EQUALIZE_MODES:
        raise InputError(f"equalize takes one of {', '.join(EQUALIZE_MODES)}, got {equalize!r}")
    _check_classes(model, data)
    device = torch.device(device)
    reset_peak_rss()
    start = time.perf_counter()
    torch.manual_seed(seed)

    fp_model = copy.deepcopy(model).to(device).eval()
    work = copy.deepcopy(model).to(device).eval()
    for param in (*fp_model.parameters(), *work.parameters()):
        param.requires_grad_(False)
    qmodel = post_training_quantize(work, spec, data, calib=calib, seed=seed, device=device)
    calib_images = calibration_images(data, calib, seed=seed)
    images = to_float(calib_images).to(device)
    quantized = time.perf_counter()

    scores: dict[str, Score | None] = {"fp": None, "nearest": None, "purified": None}
    if evaluate_models and reference_scores is not None:
        scores["fp"], scores["nearest"] = reference_scores
    elif evaluate_models:
        fp_score = evaluate(fp_model, data, trigger=trigger, target=target, device=device)
        scores["fp"] = fp_score.against(fp_score)
        nearest = evaluate(qmodel, data, trigger=trigger, target=target, device=device).against(fp_score)
        scores["nearest"] = nearest.against(fp_score, nearest)  # its DER is 50 by definition
    evaluated = time.perf_counter()

    if act_headroom != 1.0:
        widen_ranges(qmodel, act_headroom)
    widened = time.perf_counter()
    equalized, equalize_record = {}, {"mode": equalize}
    if equalize != "off":
        candidate = copy.deepcopy(work)
        scales = equalize_activations(candidate, images.split(256))
        if scales:
            q_candidate = post_training_quantize(candidate, spec, data, calib=calib, seed=seed, device=device)
            if act_headroom != 1.0:
                widen_ranges(q_candidate, act_headroom)
            if equalize == "auto":
                fp_preds = predict(fp_model, calib_images, device=device)
                agreements = {"plain": agreement(predict(qmodel, calib_images, device=device), fp_preds),
                              "equalized": agreement(predict(q_candidate, calib_images, device=device), fp_preds)}
                equalize_record["calib_agreement"] = agreements
            if equalize == "on" or agreements["equalized"] > agreements["plain"]:
                work, qmodel, equalized = candidate, q_candidate, scales
                fp_model = copy.deepcopy(candidate)
    equalized_at = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    guided = None
    if search_triggers:
        guided = with_found_triggers(fp_model, qmodel, images, seed=seed, progress=progress)
        images = guided.images
    searched = time.perf_counter()
    ctx = DefenseContext(fp_model, qmodel, images, seed, device, progress, work=work, data=data,
                         data_used={"unlabeled_train_images": len(images)})
    records, skipped = defense.run(ctx, opts)
    defended = time.perf_counter()
    for param in work.parameters():
        param.requires_grad_(True)
    qmodel.eval()

    if evaluate_models:
        scores["purified"] = (scores["nearest"] if method == "nearest" and act_headroom == 1.0 and not equalized else
                              evaluate(qmodel, data, trigger=trigger, target=target, device=device)
                              .against(scores["fp"], scores["nearest"]))
    done = time.perf_counter()
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    report = PurifyReport(
        method=method, arch=arch, spec=spec, dataset=data.describe(), calib=calib, seed=seed, device=str(device),
        options=dataclasses.asdict(opts), trigger=None if trigger is None else trigger.to_dict(), target=target,
        fp=scores["fp"], nearest=scores["nearest"], purified=scores["purified"],
        layers=[r.to_dict() for r in records], skipped_layers=list(skipped),
        trigger_search=None if guided is None else guided.to_dict(), data_used=ctx.data_used,
        act_headroom=act_headroom, equalize=equalize_record, equalized=equalized,
        seconds={"quantize": quantized - start, "equalize": equalized_at - widened,
                 "search": searched - equalized_at, "defense": defended - searched,
                 "evaluate": (evaluated - quantized) + (done - defended), "total": done - start},
        peak_memory_mb=peak)
    return qmodel, report


def reset_peak_rss() -> None:
    """Start this process's peak RSS (what getrusage reports) afresh, so a purification run in a process that
    has done other work (a bench, a Ray worker) reports its own peak. Linux only (writing 5 to
    /proc/self/clear_refs); elsewhere the peak stays the process's since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _check_classes(model: nn.Module, data: Dataset) -> None:
    from models.reference import num_classes_of

    classes = num_classes_of(model)
    if classes is not None and classes != data.num_classes:
        raise InputError(f"the model has {classes} outputs but the data {data.name!r} has "
                         f"{data.num_classes} classes")


# ---- saving and loading ----------------------------------------------------------------------------------

def save_purified(qmodel: nn.Module, out_dir: str | Path, *, report: PurifyReport | None = None,
                  arch: str | None = None) -> Path:
    """Write DIR/purified.pt (the quantized state_dict), DIR/spec.json, DIR/model.json (the model reference:
    `arch`, else the one the model was built from, else the report's), given a report DIR/report.json, and
    last DIR/manifest.json binding them (`load_purified` refuses a set that does not match it)."""
    from models.reference import canonical, check_reference, model_reference
    from qcbdefense.checkpoints import save_model

    out_dir = Path(out_dir)
    spec = getattr(qmodel, "qcb_spec", None)
    if spec is None:
        raise InputError("save_purified needs a model made by qcbdefense (quantize / purify): no qcb_spec")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a folder")
    reference = arch or model_reference(qmodel) or (report.arch if report is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST_FILE, MODEL_FILE):  # an old set is unbound before any new file lands
        (out_dir / stale).unlink(missing_ok=True)
    save_model(qmodel.state_dict(), out_dir / WEIGHTS_FILE)
    spec.save(out_dir / SPEC_FILE)
    written = [WEIGHTS_FILE, SPEC_FILE]
    if reference is not None and reference != "model":
        write_json(out_dir / MODEL_FILE, {"model": canonical(check_reference(reference))})
        written.append(MODEL_FILE)
    if report is not None:
        report.save(out_dir / REPORT_FILE)
        written.append(REPORT_FILE)
    write_json(out_dir / MANIFEST_FILE, {name: sha256_file(out_dir / name) for name in written})
    return out_dir


def _check_set(folder: Path) -> None:
    """InputError unless the files of `folder` are the set one `save_purified` call wrote (manifest.json)."""
    import json

    manifest = folder / MANIFEST_FILE
    redo = "purify again into an empty folder"
    if not manifest.is_file():
        raise InputError(f"{folder} holds no {MANIFEST_FILE}: its purify run did not finish (or predates the "
                         f"manifest); {redo}")
    try:
        hashes = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        hashes = None
    if not (isinstance(hashes, dict) and {WEIGHTS_FILE, SPEC_FILE} <= hashes.keys()):
        raise InputError(f"{manifest} is corrupt; {redo}")
    for name, digest in hashes.items():
        path = folder / str(name)
        if not path.is_file() or sha256_file(path) != digest:
            raise InputError(f"{path} is not the file written with the rest of {folder} (its sha256 differs from "
                             f"{MANIFEST_FILE}): a mixed or interrupted set; {redo}")


def load_purified(arch: str | None, path: str | Path) -> nn.Module:
    """Rebuild a purified quantized model saved by `save_purified` (a folder, or its purified.pt).

    `arch`: the model reference (`models.reference`); None reads the one recorded in the folder's
    model.json. `quantize(model, spec)` with the saved state loaded: weights, BN and every quantizer's
    state, so the outputs are identical to the saved model's. InputError for a missing file, or a state that
    does not fit `arch` under the spec (wrong architecture, or a state_dict of a float model), or files that are
    not the set one `save_purified` wrote (manifest.json).
    """
    import json

    from models.reference import check_reference, model_for_state
    from qcbdefense.checkpoints import load_state_dict

    path = Path(path)
    weights, spec_path = (path / WEIGHTS_FILE, path / SPEC_FILE) if path.is_dir() else (path, path.parent / SPEC_FILE)
    for needed in (weights, spec_path):
        if not needed.is_file():
            raise InputError(f"purified model file {needed} does not exist")
    folder = weights.parent
    _check_set(folder)
    if arch is None:
        recorded = folder / MODEL_FILE
        if not recorded.is_file():
            raise InputError(f"{folder} records no model reference ({MODEL_FILE}); give the architecture "
                             f"(--model)")
        try:
            arch = json.loads(recorded.read_text())["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{recorded} is not a model reference file") from None
    check_reference(arch)
    spec = QuantSpec.load(spec_path)
    model, state = model_for_state(arch, load_state_dict(weights))
    qmodel = quantize(model, spec)
    try:
        result = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"purified model {weights} does not fit {arch}: {str(err).splitlines()[-1].strip()}") \
            from err
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                    for keys, what in ((missing, "missing keys"), (result.unexpected_keys, "unexpected keys"))
                    if keys]
        raise InputError(f"purified model {weights} does not fit {arch} under {spec.name}: {', '.join(problems)}")
    for param in quantizer_parameters(qmodel):
        param.requires_grad_(False)
    if not is_calibrated(qmodel):
        raise InputError(f"purified model {weights} holds no calibrated activation ranges")
    return qmodel.eval()


def read_report(path: str | Path) -> PurifyReport:
    """Load a report.json written by `save_purified` (a folder means its report.json)."""
    path = Path(path)
    return PurifyReport.load(path / REPORT_FILE if path.is_dir() else path)


def report_trigger(report: PurifyReport) -> Trigger | None:
    """The trigger a report was scored with (None when it had none)."""
    return None if report.trigger is None else trigger_from_dict(report.trigger)
