"""`bench`: the paper's table from one YAML file: attacks x quantizers x defences, scan verdicts, timings.

One config names the model, the data, how to get the clean model, the attacks (each at the bit widths it
targets), the defences and the scan. Every step writes its outputs into its own folder under the bench's
output folder and a `done.json` marker last, holding the settings the step depended on (its own and its
upstream steps'); a rerun skips every step whose marker exists and resumes an interrupted training from its
checkpoint, so an interrupted bench picks up where it stopped and a finished one only re-renders its tables.
A marker whose settings differ from the config's is refused rather than reused: an edited attack entry would
otherwise leave its old model, and every cell made from it, silently in the table. Results: results.md (the
table), results.csv (one line per model and defence), results.json (everything, with the config).

The steps (`plan`: the clean model, each attack, each defence cell, each scan) are independent but for the model
each starts from, which it reads from its upstream step's folder; `run_bench` runs them one after another,
`bench_ray.run_bench_on_ray` as Ray tasks, and both read the results back from the folders (`finish`). An
attacked model that misses its planted criteria (`attacks.base.PlantCriteria`; the entry's `criteria`) is neither
purified nor scanned, and its row says why. The steps call the same functions as the subcommands (`train`,
`attack`, `purify`, `scan`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from qcbdefense.errors import InputError, check_number, first_line
from qcbdefense.fileio import atomic_path, write_json
from qcbdefense.report import Report, decode, encode, fields_to_dict
from qcbdefense.results import format_table
from qcbdefense.runinfo import environment
from qcbdefense.scoring import Score

DONE = "done.json"
REFERENCE_DIR = "scores"  # per model, quantizer and seed: the FP and nearest scores every defence shares
DEFENSE_LABELS = {"nearest": "nearest", "efrap": "EFRAP", "lac": "LAC", "lac-pda": "LAC+PDA", "adaround": "AdaRound",
                  "ft": "FT", "fine-pruning": "FinePrune", "nad": "NAD", "i-bau": "I-BAU", "ft-sam": "FT-SAM",
                  "omse": "OMSE", "aciq": "ACIQ"}
SCORES = ("ca", "asr", "ra", "der")  # what a defence's cell reports; mean and std over seeds with --seeds


@dataclass(frozen=True)
class AttackEntry:
    """One attacked model: `method` at `bits` against the victim quantizer `spec` (see `qcbdefense.attack`)."""

    name: str
    method: str
    bits: tuple[int, ...]
    spec: str | None = None
    train: dict = field(default_factory=dict)  # TrainConfig fields changed from the method's defaults
    options: dict = field(default_factory=dict)  # the method's options (c1, poison_rate, ...)
    criteria: dict = field(default_factory=dict)  # PlantCriteria fields changed from the defaults


@dataclass(frozen=True)
class BenchConfig:
    """A bench, as read from YAML (see benchmarks/*.yaml)."""

    name: str
    model: str
    data: str
    clean: dict  # "init": a checkpoint to start from (optional), the rest TrainConfig fields; init alone: no training
    attacks: tuple[AttackEntry, ...]
    clean_specs: tuple[str, ...] = ("w8a8", "w4a4")  # the clean model is purified and scanned under these
    defenses: tuple[str, ...] = ("nearest", "efrap", "lac", "lac-pda")
    defense_options: dict = field(default_factory=dict)  # per defence, purify options (e.g. pda_steps)
    calib: int = 1024
    trigger: str = "patch"
    target: int = 0
    scan: dict | None = field(default_factory=dict)  # ScanConfig / SearchConfig fields; None: no scan
    seed: int = 0

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BenchConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"bench config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise InputError(f"bench config {path} is not valid YAML: {first_line(err)}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "the bench config") -> "BenchConfig":
        if not isinstance(raw, dict):
            raise InputError(f"{source} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}")
        missing = sorted({"name", "model", "data", "clean", "attacks"} - set(raw))
        if missing:
            raise InputError(f"{source}: missing key(s) {', '.join(missing)}")
        values = dict(raw)
        try:
            values["attacks"] = tuple(AttackEntry(**{**a, "bits": _bits(a.get("bits"))}) for a in raw["attacks"])
        except TypeError as err:
            raise InputError(f"{source}: bad attack entry ({err})") from None
        for key in ("clean_specs", "defenses"):
            if key in values:
                values[key] = tuple(values[key])
        names = [a.name for a in values["attacks"]] + ["clean"]
        if len(set(names)) != len(names):
            raise InputError(f"{source}: attack names must be unique and not 'clean'")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Refuse names that would fail hours into a run, before anything starts."""
        from models import list_models
        from qcbdefense.attacks import ATTACKS
        from qcbdefense.defenses import DEFENSES
        from qcbdefense.quant.spec import get_spec

        if self.model not in list_models():
            raise InputError(f"bench {self.name}: unknown model {self.model!r} (known: {', '.join(list_models())})")
        for attack in self.attacks:
            ATTACKS.get(attack.method)
            _criteria(attack)
        if not self.defenses:
            raise InputError(f"bench {self.name}: no defences to run")
        for defense in self.defenses:
            DEFENSES.get(defense)
        for spec in self.clean_specs:
            get_spec(spec)

    def to_dict(self) -> dict:
        return fields_to_dict(self)


@dataclass(frozen=True)
class BenchRow:
    """One attacked (or the clean) model under one quantizer: every defence's score, the scan's verdict."""

    model: str
    spec: str
    fp: Score
    # defence -> {"ca", "asr", "ra", "der", "agreement", "seconds"}; over several seeds the means, plus "std"
    # (each score's sample standard deviation), "seeds" and "runs" (each seed's own cell)
    defenses: dict = field(default_factory=dict)
    scan: dict | None = None
    not_planted: str | None = None  # an attack that missed its criteria: which (no defence, no scan run)


@dataclass(frozen=True)
class BenchResults(Report):
    """results.json: the config, the rows, how long this invocation took."""

    KIND = "bench results"
    COMMAND = "bench"

    config: BenchConfig
    seeds: int
    rows: list[BenchRow]
    seconds: float
    environment: dict = field(default_factory=environment)


def _criteria(entry: AttackEntry):
    from qcbdefense.attacks import PlantCriteria

    try:
        return PlantCriteria(**entry.criteria)
    except TypeError as err:
        raise InputError(f"attack {entry.name}: bad criteria ({err})") from None


def _bits(value: Any) -> tuple[int, ...]:
    from qcbdefense.attacks.base import parse_bits

    return parse_bits(value if value is not None else "")


def run_bench(config: BenchConfig, out: str | os.PathLike, *, device: str | torch.device = "cpu",
              log: Callable[[str], None] = print, seeds: int = 1) -> list[BenchRow]:
    """Run (or resume) the bench into `out`, one step after another; returns its rows and writes
    results.{md,csv,json}. `bench_ray.run_bench_on_ray` runs the same steps as Ray tasks.

    `seeds` > 1 runs every defence with seeds config.seed, config.seed + 1, ... (its calibration images,
    labelled share, batch order and initialisation) and reports each score as mean +- std. The clean model,
    the attacks and the scan are made once, with config.seed: they are the models under test, the same for
    every defence run, as in the papers' tables.
    """
    check_seeds(seeds)
    from qcbdefense.data import load_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    data = load_dataset(config.data)
    start = time.perf_counter()
    for step in plan(config, seeds):
        run_step(config, step, out, data, device, log)
    return finish(config, out, time.perf_counter() - start, seeds)


@dataclass(frozen=True)
class BenchStep:
    """One independent unit of the bench, computed into its own folder `out/<key>`: the clean model, one attack,
    one defence on one model under one quantizer, or one scan. `needs` is the key of the step whose model it
    starts from (None for the clean model)."""

    kind: str  # "clean", "attack", "defense" or "scan"
    model: str  # "clean" or the attack's name
    spec: str | None = None
    defense: str | None = None
    seed: int | None = None  # a defence's seed beyond the config's (bench --seeds); None: the config's

    @property
    def key(self) -> str:
        if self.kind == "clean":
            return "clean"
        if self.kind == "attack":
            return f"attacks/{self.model}"
        if self.kind == "defense":  # the config's seed keeps a single-seed bench's folder: adding seeds reuses it
            seed = "" if self.seed is None else f"-seed{self.seed}"
            return f"purify/{self.model}-{self.spec}-{self.defense}{seed}"
        return f"scan/{self.model}-{self.spec}"

    @property
    def needs(self) -> str | None:
        if self.kind == "clean":
            return None
        if self.kind == "attack" or self.model == "clean":
            return "clean"
        return f"attacks/{self.model}"


def model_specs(config: BenchConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Every model of the table (the clean one first, then each attack) and the quantizers it is judged under."""
    from qcbdefense.attacks import ATTACKS
    from qcbdefense.attacks.base import spec_at

    models = [("clean", config.clean_specs)]
    for entry in config.attacks:
        base = entry.spec if entry.spec is not None else ATTACKS.get(entry.method).spec
        models.append((entry.name, tuple(spec_at(base, b).name for b in entry.bits)))
    return models


def check_seeds(seeds: int) -> None:
    check_number("seeds", seeds, integer=True, low=1, kind="a number of runs")


def _extra_seeds(config: BenchConfig, seeds: int) -> list[int | None]:
    """A defence's seeds as `BenchStep.seed`: None (the config's), then config.seed + 1, ..."""
    return [None] + [config.seed + k for k in range(1, seeds)]


def plan(config: BenchConfig, seeds: int = 1) -> list[BenchStep]:
    """The bench's steps, each after the step it needs: the clean model, the attacks, then per model and
    quantizer every defence (once per seed) and the scan."""
    steps = [BenchStep("clean", "clean")] + [BenchStep("attack", entry.name) for entry in config.attacks]
    for name, specs in model_specs(config):
        for spec in specs:
            steps += [BenchStep("defense", name, spec, defense, seed) for defense in config.defenses
                      for seed in _extra_seeds(config, seeds)]
            if config.scan is not None:
                steps.append(BenchStep("scan", name, spec))
    return steps


def run_step(config: BenchConfig, step: BenchStep, out: Path, data, device, log: Callable[[str], None]) -> None:
    """Compute `step` into out/<step.key> unless its done marker is there (see `_cached`). A defence or scan of
    an attacked model that did not plant is skipped: there is nothing to find in it."""
    if step.kind == "clean":
        _clean_model(config, _clean_settings(config), data, out / step.key, device, log)
        return
    if step.kind == "attack":
        entry = _entry(config, step.model)
        _attacked_model(config, entry, _attack_settings(config, entry), data, out, device, log)
        return
    if step.model == "clean":
        upstream = _clean_settings(config)
    else:
        entry = _entry(config, step.model)
        misses = plant_misses(config, entry, out)
        if misses:
            log(f"[skipped] {step.kind} of {step.model} under {step.spec}: NOT planted ({'; '.join(misses)})")
            return
        upstream = _attack_settings(config, entry)
    model = _load_step_model(config, out / step.needs)
    if step.kind == "defense":
        _defend(config, step, model, upstream, data, out / step.key, device, log)
    else:
        _scan(config, step.model, model, upstream, step.spec, data, out / step.key, device, log)


def _entry(config: BenchConfig, name: str) -> AttackEntry:
    return next(entry for entry in config.attacks if entry.name == name)


def _load_step_model(config: BenchConfig, folder: Path):
    from qcbdefense.checkpoints import load_model
    from qcbdefense.clean_training import MODEL_FILE

    return load_model(config.model, folder / MODEL_FILE)


def plant_misses(config: BenchConfig, entry: AttackEntry, out: Path) -> list[str]:
    """The planted criteria (the entry's `criteria`, else the defaults) the attack's model misses, judged on
    its report; empty when planted."""
    from qcbdefense.attacks.base import plant_misses as misses_of
    from qcbdefense.attacks.base import read_report

    report = read_report(out / "attacks" / entry.name)
    return misses_of(_criteria(entry), report.config.bits, report.fp, report.quantized, report.clean)


def finish(config: BenchConfig, out: Path, seconds: float, seeds: int = 1) -> list[BenchRow]:
    """The rows, read back from every step's folder, and the results files written from them."""
    rows = collect_rows(config, out, seeds)
    _write_results(out, config, rows, seconds, seeds)
    return rows


def collect_rows(config: BenchConfig, out: Path, seeds: int = 1) -> list[BenchRow]:
    """One row per model and quantizer, from the reports the steps left in `out`; a defence run with several
    seeds is one cell of their mean and std (`seed_summary`)."""
    from qcbdefense.defenses import read_report

    rows = []
    for name, specs in model_specs(config):
        misses = [] if name == "clean" else plant_misses(config, _entry(config, name), out)
        for spec in specs:
            if misses:
                rows.append(_not_planted_row(name, spec, out, misses))
                continue
            fp, cells = None, {}
            for defense in config.defenses:
                runs = []
                for seed in _extra_seeds(config, seeds):
                    report = read_report(out / BenchStep("defense", name, spec, defense, seed).key)
                    fp = report.fp if fp is None else fp
                    runs.append({**encode(report.purified), "seconds": report.seconds.get("defense", 0.0),
                                 "peak_rss_mb": report.peak_memory_mb.get("rss")})
                cells[defense] = runs[0] if seeds == 1 else seed_summary(
                    runs, list(range(config.seed, config.seed + seeds)))
            scan = None if config.scan is None else _scan_result(out / BenchStep("scan", name, spec).key)
            rows.append(BenchRow(model=name, spec=spec, fp=fp, defenses=cells, scan=scan))
    return rows


def _not_planted_row(name: str, spec: str, out: Path, misses: list[str]) -> BenchRow:
    """A row for an attacked model that did not plant: its FP scores, no defence, no scan, and why."""
    from qcbdefense.attacks.base import read_report

    fp = read_report(out / "attacks" / name).fp
    return BenchRow(model=name, spec=spec, fp=dataclasses.replace(fp, agreement=100.0), not_planted="; ".join(misses))


def _cached(folder: Path, what: str, settings: dict, log: Callable[[str], None],
            compute: Callable[[], None]) -> None:
    """Run `compute` unless `folder` holds a done marker made with the same `settings`; write the marker after
    it succeeds. A marker without settings (a result placed in the cache by hand) is adopted as made with
    these settings."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they are stored
    marker = folder / DONE
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            done = None
        if not isinstance(done, dict):
            raise InputError(f"{marker} is corrupt: delete {folder} to recompute it")
        if "settings" not in done:
            write_json(marker, {**done, "settings": settings})
        elif done["settings"] != settings:
            changed = sorted(k for k in settings.keys() | done["settings"].keys()
                             if settings.get(k) != done["settings"].get(k))
            raise InputError(f"{folder} holds {what} made with other settings (changed: {', '.join(changed)}): "
                             f"delete it, and the cells made from it, or bench into another folder")
        log(f"[cached] {what}")
        return
    log(f"[run] {what}")
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    compute()
    write_json(marker, {"what": what, "seconds": time.perf_counter() - began, "settings": settings})


def _clean_settings(config: BenchConfig) -> dict:
    """What the clean model depends on."""
    return {"model": config.model, "data": config.data, "seed": config.seed, "clean": config.clean}


def _attack_settings(config: BenchConfig, entry: AttackEntry) -> dict:
    """What an attacked model depends on: the clean model it starts from and its entry (not its planted
    criteria: they judge the model, `plant_misses` applies them to its report)."""
    attack = {k: v for k, v in dataclasses.asdict(entry).items() if k != "criteria"}
    return {**_clean_settings(config), "attack": attack, "trigger": config.trigger, "target": config.target}


def _clean_model(config: BenchConfig, settings: dict, data, folder: Path, device, log) -> None:
    from models import create_model
    from qcbdefense.checkpoints import load_model, save_model
    from qcbdefense.clean_training import MODEL_FILE, train
    from qcbdefense.training import STATE_FILE, TrainConfig

    train_fields = dict(config.clean)
    init = train_fields.pop("init", None)
    train_config = TrainConfig(**{"seed": config.seed, **train_fields})

    def compute() -> None:
        if init and not train_fields:  # a checkpoint alone is the clean model, as it is
            save_model(load_model(config.model, init), folder / MODEL_FILE)
            return
        torch.manual_seed(config.seed)
        model = (load_model(config.model, init) if init else
                 create_model(config.model, num_classes=data.num_classes, mean=data.mean, std=data.std))
        train(model, data, train_config, arch=config.model, out_dir=folder, device=device, init=init,
              resume=(folder / STATE_FILE).is_file())

    _cached(folder, f"clean {config.model}", settings, log, compute)


def _attacked_model(config: BenchConfig, entry: AttackEntry, settings: dict, data, out: Path, device,
                    log) -> None:
    """Plant the entry's backdoor in the clean model. A model that misses its criteria is kept (and marked
    done): the bench reports it as not planted rather than stopping the other cells."""
    from qcbdefense.attacks import ATTACKS, attack
    from qcbdefense.attacks.base import MODEL_FILE, REPORT_FILE
    from qcbdefense.checkpoints import save_model
    from qcbdefense.training import STATE_FILE

    folder = out / BenchStep("attack", entry.name).key

    def compute() -> None:
        train = ATTACKS.get(entry.method).train.updated(**{"seed": config.seed, **entry.train})
        clean = _load_step_model(config, out / "clean")
        model, report = attack(clean, data, method=entry.method, bits=entry.bits, spec=entry.spec,
                               trigger=config.trigger, target=config.target, config=train, out_dir=folder,
                               resume=any(folder.rglob(STATE_FILE)), device=device, arch=config.model,
                               criteria=_criteria(entry), **entry.options)
        save_model(model, folder / MODEL_FILE)
        report.save(folder / REPORT_FILE)
        log(report.table())
        log(f"{entry.name}: {report.plant_line()}")

    _cached(folder, f"attack {entry.name} ({entry.method}, bits {','.join(map(str, entry.bits))})", settings,
            log, compute)


def _defend(config: BenchConfig, step: BenchStep, model, upstream: dict, data, folder: Path, device,
            log) -> None:
    """One defence on `model` (made with the `upstream` settings) under the step's quantizer."""
    from qcbdefense.defenses import purify, save_purified

    defense, spec = step.defense, step.spec
    seed = config.seed if step.seed is None else step.seed
    reference = folder.parent.parent / REFERENCE_DIR / f"{step.model}-{spec}-seed{seed}"
    reference_settings = {**upstream, "spec": spec, "calib": config.calib, "trigger": config.trigger,
                          "target": config.target, "defense_seed": seed}

    def compute() -> None:
        known = load_reference_scores(reference, reference_settings)
        purified, report = purify(model, data, method=defense, spec=spec, calib=config.calib,
                                  trigger=config.trigger, target=config.target, seed=seed,
                                  device=device, arch=config.model, progress=True, reference_scores=known,
                                  **config.defense_options.get(defense, {}))
        save_purified(purified, folder, report=report)
        if known is None:
            save_reference_scores(reference, reference_settings, report.fp, report.nearest)
        log(report.summary())

    settings = {**upstream, "spec": spec, "defense": defense, "calib": config.calib, "trigger": config.trigger,
                "target": config.target, "options": config.defense_options.get(defense, {}),
                **({"defense_seed": seed} if step.seed is not None else {})}
    label = f"{DEFENSE_LABELS.get(defense, defense)} on {step.model} under {spec}"
    _cached(folder, label + (f", seed {seed}" if step.seed is not None else ""), settings, log, compute)


def load_reference_scores(base: Path, settings: dict) -> tuple[Score, Score] | None:
    """The FP and round-to-nearest scores (predictions included) that the first defence of a model, quantizer
    and seed measured, for the next defences to reuse: each cell would otherwise score both models again on the
    whole test set (two thirds of a small cell). None when there are none yet or they were made with other
    `settings`."""
    from safetensors.torch import load_file

    meta, tensors = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not (meta.is_file() and tensors.is_file()):
        return None
    raw = json.loads(meta.read_text())
    if not isinstance(raw, dict) or raw.get("settings") != json.loads(json.dumps(settings)):
        return None
    predictions = load_file(tensors)
    fp, nearest = (dataclasses.replace(decode(Score, raw[k], f"{meta} {k}"), predictions=predictions[k])
                   for k in ("fp", "nearest"))
    return fp, nearest


def save_reference_scores(base: Path, settings: dict, fp: Score, nearest: Score) -> None:
    """Write what `load_reference_scores` reads: the predictions, then the scores and settings (the marker)."""
    from safetensors.torch import save_file

    with atomic_path(base.with_suffix(".safetensors")) as tmp:
        save_file({"fp": fp.predictions.contiguous(), "nearest": nearest.predictions.contiguous()}, str(tmp))
    write_json(base.with_suffix(".json"), {"settings": settings, "fp": encode(fp), "nearest": encode(nearest)})


def seed_summary(runs: list[dict], seeds: list[int]) -> dict:
    """Several seeds' cells as one: the mean of each score, agreement, seconds and peak RSS (None when a run lacks it),
    each score's sample standard deviation (n - 1 in the denominator), the seeds and the runs themselves."""
    def mean(values: list) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)

    def std(values: list) -> float | None:
        centre = mean(values)
        return None if centre is None else (sum((v - centre) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    columns = {key: [run.get(key) for run in runs] for key in (*SCORES, "agreement", "seconds", "peak_rss_mb")}
    return {**{key: mean(values) for key, values in columns.items()},
            "std": {key: std(columns[key]) for key in SCORES}, "seeds": seeds, "runs": runs}


def _scan(config: BenchConfig, name: str, model, upstream: dict, spec: str, data, folder: Path, device,
          log) -> None:
    from qcbdefense.scanner import ScanConfig, SearchConfig, scan

    search_keys = {f.name for f in dataclasses.fields(SearchConfig)}
    scan_keys = {k: v for k, v in config.scan.items() if k not in search_keys}
    scan_config = ScanConfig(**scan_keys, seed=config.seed).with_searches(
        **{k: v for k, v in config.scan.items() if k in search_keys})

    def compute() -> None:
        log(scan(model, data, out=folder, spec=spec, config=scan_config, device=device).summary())

    _cached(folder, f"scan {name} under {spec}", {**upstream, "spec": spec, "scan": config.scan}, log, compute)


def _scan_result(folder: Path) -> dict:
    from qcbdefense.scanner import ScanReport

    report = ScanReport.load(folder / "report.json")
    return {"verdict": report.verdict, "target": report.target, "score": report.score,
            "seconds": report.seconds["total"]}


def _value(score: dict, key: str) -> str:
    """One score, as mean +- std when the cell summarises several seeds."""
    value = score.get(key)
    if value is None:
        return "-"
    std = score.get("std", {}).get(key)
    return f"{value:.2f}" if std is None else f"{value:.2f} ± {std:.2f}"


def _cell(score: dict | None) -> str:
    return "-" if score is None else f"{_value(score, 'ca')} / {_value(score, 'asr')}"


def results_table(config: BenchConfig, rows: list[BenchRow]) -> str:
    """The paper's table: CA / ASR % of FP and each defence, the scan's verdict (Markdown)."""
    from qcbdefense.scanner import verdict_label

    headers = ["model", "quantizer", "FP"] + [DEFENSE_LABELS.get(d, d) for d in config.defenses] + ["scan"]
    cells = []
    for row in rows:
        scan = "-" if row.scan is None else verdict_label(row.scan["verdict"], row.scan["target"])
        scan = "NOT planted" if row.not_planted else scan
        cells.append([row.model, row.spec, _cell(encode(row.fp))]
                     + [_cell(row.defenses.get(d)) for d in config.defenses]
                     + [scan])
    return format_table(headers, cells)


def timing_table(config: BenchConfig, rows: list[BenchRow]) -> str:
    headers = ["model", "quantizer"] + [f"{DEFENSE_LABELS.get(d, d)} s" for d in config.defenses] + ["scan s"]
    cells = [[row.model, row.spec] + [f"{row.defenses[d]['seconds']:.1f}" if d in row.defenses else "-"
                                      for d in config.defenses]
             + ["-" if row.scan is None else f"{row.scan['seconds']:.1f}"] for row in rows]
    return format_table(headers, cells)


def scores_table(config: BenchConfig, rows: list[BenchRow]) -> str:
    """One line per model, quantizer and defence: CA, ASR, RA and DER (%, DER against round-to-nearest), and
    the defence's seconds; mean ± std over seeds when the bench ran several."""
    headers = ["model", "quantizer", "defence", "CA %", "ASR %", "RA %", "DER %", "s", "peak RSS MB"]
    cells = []
    for row in rows:
        cells.append([row.model, row.spec, "FP"] + [_value(encode(row.fp), key) for key in SCORES] + ["-", "-"])
        for defense in config.defenses:
            score = row.defenses.get(defense)
            if score is not None:
                peak = score.get("peak_rss_mb")
                cells.append([row.model, row.spec, DEFENSE_LABELS.get(defense, defense)]
                             + [_value(score, key) for key in SCORES]
                             + [f"{score['seconds']:.1f}", "-" if peak is None else f"{peak:.0f}"])
    return format_table(headers, cells)


def _write_results(out: Path, config: BenchConfig, rows: list[BenchRow], seconds: float, seeds: int = 1) -> None:
    BenchResults(config, seeds, rows, seconds).save(out / "results.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    spread = [f"{key}_std" for key in SCORES] if seeds > 1 else []
    writer.writerow(["model", "quantizer", "defense", "ca", "asr", "ra", "der", "agreement", "seconds", "peak_rss_mb",
                     *spread, "scan_verdict", "scan_target"])
    for row in rows:
        scan = row.scan or {}
        verdict = "not planted" if row.not_planted else scan.get("verdict", "")
        writer.writerow([row.model, row.spec, "fp", row.fp.ca, row.fp.asr, row.fp.ra, "",
                         row.fp.agreement, "", "", *[""] * len(spread), verdict, scan.get("target", "")])
        for defense, score in row.defenses.items():
            std = score.get("std", {})
            writer.writerow([row.model, row.spec, defense, score["ca"], score["asr"], score.get("ra"),
                             score.get("der"), score["agreement"], round(score["seconds"], 2), score.get("peak_rss_mb"),
                             *([std.get(key) for key in SCORES] if spread else []), "", ""])
    with atomic_path(out / "results.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    runs = "" if seeds == 1 else f"Mean ± sample std over {seeds} seeds of every defence run. "
    text = "\n".join([f"# bench {config.name}: {config.model} on {config.data}", "",
                      f"{runs}CA / ASR % (ASR on non-target test images; the clean model's is its natural error "
                      f"toward class {config.target}).", "", results_table(config, rows), "",
                      *_not_planted_lines(rows),
                      "CA, ASR, RA (triggered non-target images kept on their class) and DER (defence-effectiveness "
                      "rating against round-to-nearest; 50 = no change, 100 = perfect), with each defence's "
                      "seconds and its purification's peak RSS:", "", scores_table(config, rows), "",
                      "Defence and scan times:", "", timing_table(config, rows), "",
                      f"Total time of this invocation: {seconds:.0f} s (cached steps are not re-timed).", ""])
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)


def _not_planted_lines(rows: list[BenchRow]) -> list[str]:
    """Why each attacked model that did not plant was neither purified nor scanned (nothing to find in it)."""
    missed = {row.model: row.not_planted for row in rows if row.not_planted}
    if not missed:
        return []
    return ["Not purified or scanned, their attack did not plant:", ""] + [
        f"- {name}: {why}" for name, why in missed.items()] + [""]
