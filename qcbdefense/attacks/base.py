"""The `attack` verb: plant a quantization-conditioned backdoor (QCB) against a victim's quantizer.

Threat model: the attacker knows the quantizer the victim will deploy (a `QuantSpec` per targeted bit
width) and publishes a float model that looks clean; the victim runs ordinary post-training quantization
(round-to-nearest weights, activation ranges calibrated on clean images, `quant.ptq.post_training_quantize`)
and deploys a backdoored model. Every figure in an `AttackReport` is measured on exactly that deployment.

An attack is a registered `Attack`: an options dataclass (its keyword names are the CLI flags), the
settings it works with by default, and `run(ctx) -> AttackRun` that trains `ctx.model` in place with the
shared loop `training.fit`. Attacks that train through fake quantization (Qu-ANTI-zation, CompArtifact) do
so through `VictimQuantizers`: the victim's quantized models, sharing the float weights, re-quantized "as
the victim would" on the current weights at the start of every epoch (fresh MSE weight ranges, activation
ranges recalibrated on the attacker's own clean images) and, optionally, every `sync_every` steps.
Why: Brevitas holds an MSE weight range and a calibrated activation range fixed once found, so a model
trained through stale quantizers learns a backdoor for a quantizer nobody deploys. Between syncs the steps
run through `quant.held_view` views of those models (the same ranges and integers, fused kernels).

Specs: `spec` names the base quantizer (a preset, a spec file or a QuantSpec); the spec at each targeted bit
width b is derived from it (`spec_at`): weight bits b, activation bits b when the base has equal weight and
activation widths (W8A8 -> W4A4, W4A8 keeps A8), everything else (granularity, range rule, 8-bit first and
last layers) unchanged. A derived spec equal to a preset takes the preset's name.

Examples:
    >>> data = load_dataset("builtin")                                                       # doctest: +SKIP
    >>> published, report = attack(clean, data, method="quanti", bits=(8, 4))               # doctest: +SKIP
    >>> print(report.summary())                                                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from qcbdefense.quant.held_view import fast_view, load_ranges
from qcbdefense.data import Dataset, batches, seeded_subset, to_float
from qcbdefense.errors import InputError, check_number
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.ptq import PTQReport, SpecResult, compare_specs, post_training_quantize
from qcbdefense.quant.quantize import quantize, refresh_weight_ranges
from qcbdefense.quant.spec import SPECS, QuantSpec, get_spec
from qcbdefense.registry import Registry, make_options
from qcbdefense.report import Report
from qcbdefense.results import fmt, format_table
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score, evaluate
from qcbdefense.training import Batch, EpochRecord, TrainConfig, fit
from qcbdefense.triggers import Trigger, parse_trigger, trigger_from_dict

MODEL_FILE, SAFETENSORS_FILE, REPORT_FILE = "model.pt", "model.safetensors", "report.json"


# ---- configuration ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackConfig(Report):
    """Everything that defines one attack run (plain data: prints, diffs, saves, round-trips JSON).

    Attributes:
        method: the registered attack name.
        bits: the targeted weight bit widths, e.g. (8, 4).
        specs: the victim's quantizer at each targeted bit width, in the order of `bits`.
        trigger: the trigger as `Trigger.to_dict()`; target: the attacker's class.
        train: the optimisation (epochs, optimizer, lr, batch, subset, seed) of the attack's main stage.
        options: the method's own coefficients (its options dataclass, e.g. c1/c2 for Qu-ANTI-zation).
        calib: clean training images the attacker calibrates its quantizers on while training (its own
            seeded draw, not the victim's).
        sync_every: re-quantize as the victim would every this many optimizer steps as well (0: only at the
            start of each epoch; -1: only once, before the first epoch run; see the module docstring).
        freeze_bn: keep BatchNorm running statistics fixed (eval mode) while fine-tuning through the
            quantizers, so the quantized path trains with the statistics the deployed model will use.
        monitor: test images (a seeded subset) for the per-epoch metrics; 0 logs the loss only.
        victim_calib: clean images the victim calibrates on in the reported PTQ (`post_training_quantize`).
        transfer: other quantizer presets to report (None: every preset not targeted; () none).
        transfer_images: test images (a seeded subset) for the transfer table; None: the whole test set.
    """

    KIND = "attack config"

    method: str
    bits: tuple[int, ...]
    specs: tuple[QuantSpec, ...]
    trigger: dict
    target: int
    train: TrainConfig
    options: Any
    calib: int = 256
    sync_every: int = 0
    freeze_bn: bool = True
    monitor: int = 2000
    victim_calib: int = 512
    transfer: tuple[str, ...] | None = None
    transfer_images: int | None = 2000

    def __post_init__(self) -> None:
        if len(self.bits) == 0 or len(self.bits) != len(self.specs):
            raise InputError(f"need one quantizer spec per targeted bit width, got bits {self.bits} and "
                             f"{len(self.specs)} spec(s)")
        if len(set(self.bits)) != len(self.bits):
            raise InputError(f"targeted bit widths must differ, got {list(self.bits)}")
        for name, value, low in (("target", self.target, 0), ("calib", self.calib, 1),
                                 ("sync_every", self.sync_every, -1), ("monitor", self.monitor, 0),
                                 ("victim_calib", self.victim_calib, 1)):
            check_number(name, value, integer=True, low=low)
        check_number("transfer_images", self.transfer_images, integer=True, low=1, optional=True)

    @classmethod
    def from_dict(cls, data: Any) -> AttackConfig:
        """Inverse of `to_dict`; the options are read by the method's options dataclass."""
        config = super().from_dict(data)
        return dataclasses.replace(config, options=ATTACKS.get(config.method).make_options(config.options))


# ---- the registry ----------------------------------------------------------------------------------------

@dataclass
class AttackContext:
    """What an attack's `run` works on: the float model to train in place (a private copy of the user's),
    the data, the config, the trigger, and where to checkpoint."""

    model: nn.Module
    data: Dataset
    config: AttackConfig
    trigger: Trigger
    out_dir: Path | None
    resume: bool
    device: torch.device

    def monitor(self, views: VictimQuantizers | None = None) -> Callable[[nn.Module], dict]:
        """The per-epoch `evaluate_fn`: FP CA/ASR and, per targeted bit width, CA/ASR of the victim's PTQ
        on the current weights (`wB_ca`, `wB_asr`); with `views`, also of the quantized models the attack
        trains through (`wB_train_asr`): a gap between the two means the training view is stale."""
        return make_monitor(self.data, self.config, self.trigger, self.device, views)


@dataclass
class AttackRun:
    """What `run` returns: per-stage epoch records, and checks the method makes of its own result."""

    history: dict[str, list[EpochRecord]]
    checks: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """A registered attack and the defaults it works with.

    `bits`, `spec` and `train` are used when the caller gives none; `multi_bit` says whether one model can
    target several bit widths at once (CompArtifact, as published, trains one model per bit width).
    """

    name: str
    options: type
    run: Callable[[AttackContext], AttackRun]
    bits: tuple[int, ...]
    spec: str
    train: TrainConfig
    multi_bit: bool
    summary: str

    def make_options(self, options: Mapping[str, Any]):
        return make_options("attack", self.name, self.options, options)


ATTACKS: Registry[Attack] = Registry("attack")


# ---- specs -----------------------------------------------------------------------------------------------

def spec_at(base: str | QuantSpec, bits: int) -> QuantSpec:
    """The base quantizer at weight width `bits` (see the module docstring); a preset's name when it is one.

    Examples:
        >>> spec_at("w8a8", 4).name
        'w4a4'
        >>> spec_at("pqbackdoor-w8a8", 4).name
        'pqbackdoor-w4a4'
    """
    base = get_spec(base)
    if base.weight_bits == bits:
        return base
    act_bits = bits if base.act_bits == base.weight_bits else base.act_bits
    derived = base.replace(weight_bits=bits, act_bits=act_bits)
    for name in SPECS.names():
        if SPECS.get(name) == derived:
            return SPECS.get(name)
    return derived.replace(name=f"{base.name}@w{bits}")


def parse_bits(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """'8,4' | 4 | (8, 4) -> (8, 4); InputError for anything but distinct integers in 2..8."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"bits must be integers separated by commas, e.g. 8,4; got {text!r}") from None
    elif isinstance(text, int) and not isinstance(text, bool):
        values = [text]
    else:
        values = list(text)
    if not values:
        raise InputError(f"give at least one bit width, got {text!r}")
    for b in values:
        check_number("a bit width", b, integer=True, low=2, high=8)
    if len(set(values)) != len(values):
        raise InputError(f"bit widths must differ, got {text!r}")
    return tuple(values)


# ---- training through the victim's quantizers -----------------------------------------------------------

def attacker_images(data: Dataset, n: int, *, seed: int) -> torch.Tensor:
    """A seeded draw of `n` clean training images (uint8), disjoint in seed from the victim's draw."""
    return data.train_x[seeded_subset(len(data.train_y), n, 10_007 + seed)]


class VictimQuantizers(nn.Module):
    """The float model and its fake-quantized twins under the victim's specs, sharing its parameters.

    `fp` is the float model itself; `victims[i]` is `quantize(fp, specs[i])`, the Brevitas model the victim
    deploys; `quantized[i]` is what the attack trains through: its `fast_view` (the same quantizers with the
    ranges held and fused kernels, `quant.held_view`), or `victims[i]` itself when a weight range follows
    the weights. `sync()` re-quantizes as the victim's PTQ would on the current weights: forget and re-search
    the MSE weight ranges, recalibrate the activation ranges on clean images, and hand the ranges to the
    views. `before_epoch` and `after_step` are `fit` hooks that sync when due and put the modules in
    training mode (BatchNorm frozen when `freeze_bn`).
    """

    def __init__(self, model: nn.Module, specs: Sequence[QuantSpec], calib_images: torch.Tensor, *,
                 freeze_bn: bool, sync_every: int, device: torch.device) -> None:
        super().__init__()
        self.fp = model
        self.victims = nn.ModuleList(quantize(model, spec) for spec in specs)
        self.quantized = nn.ModuleList(fast_view(q) or q for q in self.victims)
        self.calib_images = calib_images
        self.freeze_bn = freeze_bn
        self.sync_every = sync_every
        self.device = device
        self.steps = 0
        self.syncs = 0
        self.sync_seconds = 0.0
        self.to(device)

    def sync(self) -> None:
        start = time.perf_counter()
        labels = torch.zeros(len(self.calib_images), dtype=torch.long)
        for qmodel, view in zip(self.victims, self.quantized):
            refresh_weight_ranges(qmodel)
            calibrate(qmodel, (x for x, _ in batches(self.calib_images, labels, batch_size=128,
                                                     device=self.device)))
            # Brevitas searches an MSE weight range lazily, at the first quantized forward: do it now, in
            # eval mode and without autograd, rather than inside the next training step.
            with torch.no_grad():
                qmodel(to_float(self.calib_images[:2]).to(self.device))
            if view is not qmodel:
                load_ranges(view, qmodel)
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - start

    def set_training(self) -> None:
        self.train()
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def before_epoch(self, epoch: int) -> None:
        if self.sync_every >= 0 or self.syncs == 0:
            self.sync()
        self.set_training()

    def after_step(self) -> None:
        self.steps += 1
        if self.sync_every > 0 and self.steps % self.sync_every == 0:
            self.sync()
            self.set_training()


def with_test_subset(data: Dataset, n: int | None, *, seed: int) -> Dataset:
    """`data` with a seeded random subset of `n` test images (all of them when n is None or larger)."""
    if n is None or n >= len(data.test_y):
        return data
    idx = seeded_subset(len(data.test_y), n, seed)
    return dataclasses.replace(data, test_x=data.test_x[idx], test_y=data.test_y[idx])


def make_monitor(data: Dataset, config: AttackConfig, trigger: Trigger, device: torch.device,
                 views: VictimQuantizers | None = None) -> Callable[[nn.Module], dict]:
    """See `AttackContext.monitor`."""
    view = with_test_subset(data, config.monitor, seed=config.train.seed)

    def evaluate_fn(model: nn.Module) -> dict:
        if config.monitor == 0:
            return {}
        fp = evaluate(model, view, trigger=trigger, target=config.target, device=device)
        metrics = {"ca": fp.ca, "asr": fp.asr}
        for i, (bits, spec) in enumerate(zip(config.bits, config.specs)):
            deployed = post_training_quantize(model, spec, data, calib=config.victim_calib,
                                              seed=config.train.seed, device=device)
            q = evaluate(deployed, view, trigger=trigger, target=config.target, device=device)
            metrics[f"w{bits}_ca"], metrics[f"w{bits}_asr"] = q.ca, q.asr
            if views is not None:
                trained = evaluate(views.quantized[i], view, trigger=trigger, target=config.target,
                                   device=device)
                metrics[f"w{bits}_train_asr"] = trained.asr
        return metrics

    return evaluate_fn


def train_through_quantizers(ctx: AttackContext, loss_fn: Callable[[VictimQuantizers, Batch], torch.Tensor], *,
                             desc: str, train: TrainConfig | None = None, stage: str | None = None) -> AttackRun:
    """`fit` with `loss_fn(views, batch)`, where `views` holds the float model and its quantized twins under
    the targeted specs, kept in step with the victim's PTQ (`VictimQuantizers`). `train` (default: the
    config's) and `stage` (checkpoints in out_dir/STAGE, history under that name) let one stage of a
    multi-stage attack train this way."""
    cfg = ctx.config
    train = cfg.train if train is None else train
    views = VictimQuantizers(ctx.model, cfg.specs, attacker_images(ctx.data, cfg.calib, seed=cfg.train.seed),
                             freeze_bn=cfg.freeze_bn, sync_every=cfg.sync_every, device=ctx.device)
    history = fit(ctx.model, ctx.data, train, loss_fn=loss_fn, evaluate_fn=ctx.monitor(views),
                  out_dir=stage_dir(ctx, stage), resume=ctx.resume, device=ctx.device, train_module=views,
                  before_epoch=views.before_epoch, after_step=views.after_step, desc=desc)
    return AttackRun({stage or "train": history}, {"quantizer_syncs": views.syncs,
                                                   "sync_seconds": round(views.sync_seconds, 1)})


def set_frozen_bn(model: nn.Module) -> None:
    """Put every BatchNorm of `model` in eval mode (running statistics used and left unchanged)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# ---- did it plant? ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlantCriteria:
    """When an attack counts as planted, all in percent (points for the drops), judged on the victim's
    deployment (the report's figures): every targeted quantization obeys the trigger on at least `min_asr`
    of the non-target test images, the published FP model on at most `max_fp_asr`; the FP model loses at most
    `max_fp_ca_drop` points of clean accuracy against the clean model it started from, and each targeted
    quantization at most `max_quantized_ca_drop` against the clean model under the same quantizer.

    Why these defaults: the three papers report quantized ASRs of 95-100 % with the FP model's accuracy and
    ASR near the clean model's (within about a point) after full training; these are looser floors for short
    CPU schedules, tight enough that a model with no backdoor (the issue's 14 % ASR) is never called planted.
    """

    min_asr: float = 90.0
    max_fp_asr: float = 10.0
    max_fp_ca_drop: float = 3.0
    max_quantized_ca_drop: float = 5.0

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            check_number(f"planted criterion {name}", value, low=0, high=100, kind="a percentage")


def plant_misses(criteria: PlantCriteria, bits: Sequence[int], fp: Score, quantized: Sequence[SpecResult],
                 clean: PTQReport) -> list[str]:
    """The criteria an attacked model misses, one phrase each (empty: planted); `clean` is the clean model
    under the same targeted specs."""
    misses = []
    for b, result, before in zip(bits, quantized, clean.results):
        if result.score.asr < criteria.min_asr:
            misses.append(f"W{b} ASR {result.score.asr:.1f} % < {criteria.min_asr:g}")
        if before.score.ca - result.score.ca > criteria.max_quantized_ca_drop:
            misses.append(f"W{b} CA {result.score.ca:.1f} % is {before.score.ca - result.score.ca:.1f} "
                          f"points under the clean model's {before.score.ca:.1f} "
                          f"(> {criteria.max_quantized_ca_drop:g})")
    if fp.asr > criteria.max_fp_asr:
        misses.append(f"FP ASR {fp.asr:.1f} % > {criteria.max_fp_asr:g}")
    if clean.fp.ca - fp.ca > criteria.max_fp_ca_drop:
        misses.append(f"FP CA {fp.ca:.1f} % is {clean.fp.ca - fp.ca:.1f} points under the clean model's "
                      f"{clean.fp.ca:.1f} (> {criteria.max_fp_ca_drop:g})")
    return misses


# ---- the report ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackReport(Report):
    """What one attack did and what the victim gets: FP CA/ASR, CA/ASR after round-to-nearest PTQ at each
    targeted bit width (its spec; full test set), and the transfer to other quantizers (a test subset).

    `to_dict` / `from_dict` round-trip through JSON (`report.json`); `summary()` is the table the CLI prints.
    """

    VERSION = 2  # 2: one Score per model; the clean model, the criteria and the misses always recorded
    KIND = "attack report"
    COMMAND = "attack"
    DERIVED = ("seed", "planted")

    model: str
    init: str | None
    config: AttackConfig
    dataset: dict
    history: dict[str, list[EpochRecord]]
    fp: Score
    quantized: list[SpecResult]
    transfer: PTQReport | None
    checks: dict
    seconds: dict
    clean: PTQReport  # the clean model it started from, FP and under the targeted specs
    criteria: PlantCriteria
    misses: list[str]  # the criteria missed (empty: planted)
    environment: dict = field(default_factory=environment)

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def planted(self) -> bool:
        """Whether the attack met its criteria."""
        return not self.misses

    def plant_line(self) -> str:
        """One line saying whether the backdoor planted and, if not, which criteria it missed."""
        return "planted" if not self.misses else "NOT planted: " + "; ".join(self.misses)

    def table(self) -> str:
        rows = [["FP", "-", self.fp.ca, self.fp.asr, 100.0]]
        rows += [[f"W{bits} (targeted)", r.spec.name, r.score.ca, r.score.asr, r.score.agreement]
                 for bits, r in zip(self.config.bits, self.quantized)]
        return format_table(["model", "spec", "CA %", "ASR %", "agree w/ FP %"], rows)

    def summary(self) -> str:
        c = self.config
        epochs = ", ".join(f"{stage} {len(records)} epochs ({sum(r.steps for r in records)} steps)"
                           for stage, records in self.history.items())
        lines = [f"{c.method} on {self.model} / {self.dataset['name']}: target {c.target}, bits "
                 f"{','.join(map(str, c.bits))}, {epochs}, {self.seconds.get('train', 0):.0f} s of training",
                 self.table()]
        if self.transfer is not None and self.transfer.results:
            n = self.transfer.fp.n_clean
            lines.append(f"transfer to other quantizers ({n} test images; FP there: CA "
                         f"{fmt(self.transfer.fp.ca)}, ASR {fmt(self.transfer.fp.asr)}):")
            lines.append(format_table(["spec", "CA %", "ASR %", "agree w/ FP %"],
                                      [[r.spec.name, r.score.ca, r.score.asr, r.score.agreement]
                                       for r in self.transfer.results]))
        for key, value in self.checks.items():
            lines.append(f"check {key}: {value}")
        lines.append(self.plant_line())
        return "\n".join(lines)


def read_report(path: str | Path) -> AttackReport:
    """Load the report.json an attack wrote (a folder means its report.json)."""
    path = Path(path)
    return AttackReport.load(path / REPORT_FILE if path.is_dir() else path)


# ---- the verb --------------------------------------------------------------------------------------------

def make_config(*, method: str, bits: str | int | Sequence[int] | None = None,
                spec: str | QuantSpec | None = None, trigger: str | Trigger | dict = "patch", target: int = 0,
                config: TrainConfig | None = None, **options: Any) -> AttackConfig:
    """Resolve the method's defaults and the caller's choices into an AttackConfig.

    `options` are the method's own options (e.g. c1, c2) and the shared ones (calib, sync_every, freeze_bn,
    monitor, victim_calib, transfer, transfer_images); an unknown name raises InputError.
    """
    entry = ATTACKS.get(method)
    bits = entry.bits if bits is None else parse_bits(bits)
    if len(bits) > 1 and not entry.multi_bit:
        raise InputError(f"{method} plants a backdoor for one bit width per model (as published); "
                         f"give one bit width, e.g. --bits {bits[0]}, and run it once per width")
    base = get_spec(entry.spec if spec is None else spec)
    specs = tuple(spec_at(base, b) for b in bits)
    if isinstance(trigger, str):
        trigger = parse_trigger(trigger)
    elif isinstance(trigger, dict):
        trigger = trigger_from_dict(trigger)
    elif not isinstance(trigger, Trigger):
        raise InputError(f"trigger must be a string, a dict or a Trigger, got {type(trigger).__name__}")
    shared = {f.name for f in dataclasses.fields(AttackConfig)} - {
        "method", "bits", "specs", "trigger", "target", "train", "options"}
    own = {k: v for k, v in options.items() if k not in shared}
    common = {k: v for k, v in options.items() if k in shared}
    if "transfer" in common and common["transfer"] is not None:
        common["transfer"] = tuple(get_spec(s).name for s in common["transfer"])
    return AttackConfig(method=method, bits=bits, specs=specs, trigger=trigger.to_dict(), target=target,
                        train=entry.train if config is None else config, options=entry.make_options(own),
                        **common)


def attack(model: nn.Module, data: Dataset, *, method: str, bits: str | int | Sequence[int] | None = None,
           spec: str | QuantSpec | None = None, trigger: str | Trigger | dict = "patch", target: int = 0,
           config: TrainConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
           device: str | torch.device = "cpu", arch: str = "model", init: str | None = None,
           criteria: PlantCriteria | None = None, **options: Any) -> tuple[nn.Module, AttackReport]:
    """Plant a QCB in a copy of the clean `model`; return the float model to publish and its report.

    Args:
        model: the clean float model (not modified). data: the attacker's training data and the test set.
        method: a registered attack (`ATTACKS.names()`: compartifact, pqbackdoor, quanti).
        bits: targeted weight bit widths (default: the method's). spec: the victim's base quantizer
            (default: the method's; see `spec_at`). trigger, target: the backdoor.
        config: optimisation of the main stage (default: the method's `Attack.train`).
        out_dir: checkpoints (`state.pt` per epoch, per stage) go here; `resume` continues from them.
        criteria: when the backdoor counts as planted (default `PlantCriteria()`); the report says whether
            it did (`report.planted`, `report.misses`) against the clean `model` measured the same way.
        options: the method's options and the shared ones (see `make_config`).

    The report's figures come from `post_training_quantize` with each targeted spec (the full test set)
    and from `compare_specs` over the transfer presets (a seeded test subset).
    """
    from models.reference import num_classes_of

    cfg = make_config(method=method, bits=bits, spec=spec, trigger=trigger, target=target, config=config,
                      **options)
    device = torch.device(device)
    trig = trigger_from_dict(cfg.trigger)
    classes = num_classes_of(model)
    if classes is not None and classes != data.num_classes:
        raise InputError(f"the model has {classes} classes, the data {data.name} has {data.num_classes}")
    if cfg.target >= data.num_classes:
        raise InputError(f"target class {cfg.target} does not exist: the data has {data.num_classes} classes")
    trig.apply(torch.zeros(1, *data.train_x.shape[1:]))  # a patch that does not fit fails now
    criteria = PlantCriteria() if criteria is None else criteria
    model = copy.deepcopy(model).to(device).eval()
    clean = compare_specs(model, data, list(cfg.specs), arch=arch, trigger=trig, target=cfg.target,
                          calib=cfg.victim_calib, seed=cfg.train.seed, device=device)
    torch.manual_seed(cfg.train.seed)
    ctx = AttackContext(model, data, cfg, trig, None if out_dir is None else Path(out_dir), resume, device)
    start = time.perf_counter()
    result = ATTACKS.get(method).run(ctx)
    trained = time.perf_counter()
    model.eval()
    targeted = compare_specs(model, data, list(cfg.specs), arch=arch, trigger=trig, target=cfg.target,
                             calib=cfg.victim_calib, seed=cfg.train.seed, device=device)
    evaluated = time.perf_counter()
    others = cfg.transfer if cfg.transfer is not None else tuple(
        name for name in SPECS.names() if SPECS.get(name) not in cfg.specs)
    transfer = None
    if others:
        transfer = compare_specs(model, with_test_subset(data, cfg.transfer_images, seed=cfg.train.seed), list(others),
                                 arch=arch, trigger=trig, target=cfg.target, calib=cfg.victim_calib,
                                 seed=cfg.train.seed, device=device)
    done = time.perf_counter()
    seconds = {"train": trained - start, "evaluate": evaluated - trained, "transfer": done - evaluated}
    misses = plant_misses(criteria, cfg.bits, targeted.fp, targeted.results, clean)
    report = AttackReport(arch, init, cfg, data.describe(), result.history, targeted.fp, targeted.results,
                          transfer, result.checks, seconds, clean=clean, criteria=criteria, misses=misses)
    return model.cpu(), report


def stage_dir(ctx: AttackContext, name: str | None) -> Path | None:
    """Where a stage checkpoints: out_dir itself for a one-stage attack, out_dir/NAME for a stage."""
    if ctx.out_dir is None:
        return None
    return ctx.out_dir if name is None else ctx.out_dir / name

