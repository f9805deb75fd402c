"""The `qcbdefense` command: a thin layer over the Python API, one subcommand per verb.

Expected failures (bad paths, unknown names, corrupt files, nonsense options) print one line and exit 2.
Exit 1: a scan found the model suspicious, or a verify/harden gate failed. Exit 3: an attack ran but its
backdoor did not plant (missed its criteria; `--allow-weak` accepts it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from qcbdefense import __version__
from qcbdefense.errors import InputError, QcbError

EXIT_NOT_PLANTED = 3


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"qcbdefense: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _percentage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage in [0, 100], got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage in [0, 100], got {text!r}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where decoded datasets are cached (default $QCBDEFENSE_CACHE or ~/.cache/qcbdefense)")


def _model_reference(text: str) -> str:
    from models.reference import check_reference

    try:
        return check_reference(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_model_option(p: argparse.ArgumentParser, *, required: bool = True, what: str = "the model") -> None:
    """--model (a model reference, models/reference.py) and the input statistics of an outside model."""
    from models import list_models

    p.add_argument("--model", required=required, default=None, type=_model_reference, metavar="MODEL",
                   help=f"{what}: a zoo name ({', '.join(list_models())}), torchvision:NAME, timm:NAME, "
                        f"PACKAGE.MODULE:CALLABLE (called with num_classes=), each optionally with builder "
                        f"arguments, quoted: 'torchvision:NAME(KEY=VALUE,...)'; or an FP .onnx file")
    p.add_argument("--mean", type=_floats, default=None,
                   help="input mean R,G,B the model normalises pixels with (outside models; default CIFAR's; "
                        "an .onnx file: give it when the file expects normalised input)")
    p.add_argument("--std", type=_floats, default=None, help="input std R,G,B (see --mean)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if len(values) != 3 or any(v != v for v in values):
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B, got {text!r}")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_model_option(p)
    p.add_argument("--ckpt", type=_existing_file, default=None,
                   help="weights: a state_dict (.pt/.pth/.th, loaded weights-only) or .safetensors "
                        "(not needed for an .onnx --model, which holds its weights)")
    p.add_argument("--data", required=True, help="builtin[:SEED] | cifar10:PATH | folder:PATH (dir or .tar.gz)")


def _add_trigger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger", default=None,
                   help="e.g. patch (4x4 white, bottom-right), patch:size=3,position=top-left, blend:alpha=0.1")
    p.add_argument("--target", type=int, default=0, help="the attacker's target class")


def _add_optimisation(p: argparse.ArgumentParser, *, epochs: int, lr: float, optimizer: str = "sgd",
                      weight_decay: float = 5e-4) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs)
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="train this many optimizer steps instead of --epochs, whatever the dataset's size")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=optimizer)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--train-subset", type=_positive_int, default=None,
                   help="train on a seeded random subset of this many training images")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")


def _train_config(args: argparse.Namespace):
    from qcbdefense.training import TrainConfig

    return TrainConfig(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer,
                       lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       augment=not args.no_augment, train_subset=args.train_subset, seed=args.seed)


# Arguments naming a file or folder a command reads: no output may land on one of them.
_INPUT_ARGS = ("ckpt", "init", "onnx", "reference", "fp", "quantized", "purified", "config")


def _check_outputs(args: argparse.Namespace, *files: Path, folder: Path | None = None) -> None:
    """Before any work: every output can be written, and none is one of the command's inputs (a report
    written over the checkpoint it reports on)."""
    from qcbdefense.fileio import check_output, same_file

    if folder is not None:
        check_output(folder, folder=True)
    for path in files:
        check_output(path)
        for name in _INPUT_ARGS:
            given = getattr(args, name, None)
            if given is not None and same_file(path, given):
                raise InputError(f"the output {path} is the input --{name.replace('_', '-')} {given}: writing it "
                                 f"would destroy the input; give another --out")


def _check_fits_data(args: argparse.Namespace, data, **models) -> None:
    """Refuse what could only give a false figure: a model (a module or an .onnx path, keyed by its flag) whose
    class count is not the data's, a --target that is no class of the data (an ASR that cannot be anything but
    0), or more --calib / --victim-calib images than the data's training split holds."""
    from models.reference import num_classes_of

    for flag, model in models.items():
        if model is None:
            continue
        if isinstance(model, Path):
            from export.ort import OrtModel

            classes = OrtModel(model).num_classes
        else:
            classes = num_classes_of(model)
        if classes is not None and classes != data.num_classes:
            raise InputError(f"--{flag} {getattr(args, flag)} has {classes} classes but the data {data.name} has "
                             f"{data.num_classes}: its figures would mean nothing")
    target = getattr(args, "target", None)
    if target is not None and not 0 <= target < data.num_classes:
        raise InputError(f"--target {target}: target class {target} does not exist, the data {data.name} has "
                         f"classes 0..{data.num_classes - 1}")
    for flag in ("calib", "victim_calib"):
        wanted = getattr(args, flag, None)
        if wanted is not None and wanted > len(data.train_y):
            raise InputError(f"--{flag.replace('_', '-')} {wanted}: the data {data.name} has only "
                             f"{len(data.train_y)} training images")


def _calib(args: argparse.Namespace, data) -> int:
    """--calib as given, or the command's default cut to the training images there are (the number used is
    the number every report records)."""
    return args.calib if args.calib is not None else min(args.default_calib, len(data.train_y))


def _add_calib(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("--calib", type=_positive_int, default=None, help=f"{help} (default {default})")
    p.set_defaults(default_calib=default)


def cmd_train(args: argparse.Namespace) -> int:
    from models.reference import build_model
    from qcbdefense.checkpoints import load_model
    from qcbdefense.data import load_dataset
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.clean_training import MODEL_FILE, REPORT_FILE, train
    from qcbdefense.training import STATE_FILE

    device = resolve_device(args.device)
    config = _train_config(args)
    _check_outputs(args, *(args.out / name for name in (MODEL_FILE, STATE_FILE, REPORT_FILE)), folder=args.out)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_model(args.model, args.init, mean=args.mean, std=args.std)
        _check_fits_data(args, data, init=model)
    else:
        model = build_model(args.model, num_classes=data.num_classes, mean=args.mean or data.mean,
                            std=args.std or data.std)
    report = train(model, data, config, arch=args.model, out_dir=args.out, resume=args.resume, device=device,
                   init=None if args.init is None else str(args.init))
    print(report.summary())
    print(f"weights: {args.out / 'model.pt'}   report: {args.out / 'report.json'}")
    return 0


def _load_arch(args: argparse.Namespace):
    """The FP model of --model and --ckpt (an .onnx --model holds its weights: --ckpt is optional)."""
    from models.reference import build_model, is_onnx
    from qcbdefense.checkpoints import load_model

    if args.ckpt is not None:
        return load_model(args.model, args.ckpt, mean=args.mean, std=args.std)
    if not is_onnx(args.model):
        raise InputError(f"--ckpt is needed: --model {args.model} names an architecture, not weights")
    return build_model(args.model, mean=args.mean, std=args.std)


def _source_file(args: argparse.Namespace) -> Path:
    """The file the FP weights came from: --ckpt, or the .onnx --model itself."""
    return args.ckpt if args.ckpt is not None else Path(args.model)


def cmd_quantize(args: argparse.Namespace) -> int:
    from qcbdefense.data import load_dataset
    from qcbdefense.quant.ptq import compare_specs
    from qcbdefense.quant.spec import get_spec
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.triggers import parse_trigger

    device = resolve_device(args.device)
    specs = [get_spec(s) for s in (args.spec or ["w8a8", "w4a4"])]
    trigger = None if args.trigger is None else parse_trigger(args.trigger)
    if args.out is not None:
        _check_outputs(args, args.out)
    model = _load_arch(args)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    _check_fits_data(args, data, ckpt=model)
    torch.manual_seed(args.seed)
    report = compare_specs(model, data, specs, arch=args.model, trigger=trigger, target=args.target,
                           calib=_calib(args, data), seed=args.seed, device=device)
    print(report.table())
    if args.out is not None:
        report.save(args.out)
        print(f"report: {args.out}")
    return 0


# The files `purify` writes (qcbdefense.defenses.base's names; not imported here: it imports Brevitas).
PURIFIED_FILES = ("purified.pt", "spec.json", "model.json", "report.json", "manifest.json")

# Listed here rather than read from DEFENSES so that building the parser does not import Brevitas (seconds);
# tests/qcbdefense/defenses/test_purify.py checks that this list is DEFENSES.names().
PURIFY_METHODS = ("aciq", "adaround", "efrap", "fine-pruning", "ft", "ft-sam", "i-bau", "lac", "lac-pda", "nad",
                  "nearest", "omse")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="reconstruction steps per layer, at most (default: the method's)")
    p.add_argument("--released", action="store_true",
                   help="the authors' schedule: 10,000 steps a layer, no early stopping, last iterate kept "
                        "(lac-pda: also 500 PDA steps)")
    p.add_argument("--pda-steps", type=_positive_int, default=None,
                   help="lac-pda: PDA steps per layer (default 10; the release's 500 reach the same perturbation)")
    p.add_argument("--learn-act-range", action="store_true",
                   help="also learn each layer's output activation range with its weights (beyond the release)")
    p.add_argument("--search-triggers", action="store_true",
                   help="first search a patch per class that moves only the quantized model (or, failing that, "
                        "a square that raises one class's quantized log-probability), and calibrate on stamped "
                        "copies too (beyond the release)")
    p.add_argument("--equalize", choices=("off", "on", "auto"), default=None,
                   help="scale down the activation channels whose range dwarfs the rest of their tensor (and up "
                        "where they are read: the float model unchanged) before quantizing; auto: only when the "
                        "model so quantized agrees with FP on more calibration images (beyond the release; "
                        "purify: off, harden: auto with 8-bit activations when torch.fx traces the model)")
    p.add_argument("--act-headroom", type=float, default=None, metavar="FACTOR",
                   help="widen every activation range but the image's by FACTOR before the defence, so a trigger "
                        "cannot hide in the clip of a range calibrated on clean images (beyond the release; "
                        "purify: 1, harden: 3 with 8-bit activations)")


def _schedule_options(args: argparse.Namespace) -> dict:
    """--released / --steps / --pda-steps / --learn-act-range / --search-triggers / --equalize / --act-headroom as
    purify options (shared by purify and harden)."""
    options: dict = {}
    if args.released:
        from qcbdefense.defenses import DEFENSES

        released = DEFENSES.get(args.method).released_options()
        if not released:
            raise InputError(f"--released: method {args.method!r} has no schedule to release")
        options.update(released)
    if args.steps is not None:
        options["steps"] = args.steps
    if args.pda_steps is not None:
        options["pda_steps"] = args.pda_steps
    if args.learn_act_range:
        options["learn_act_range"] = True
    if args.search_triggers:
        options["search_triggers"] = True
    if args.equalize is not None:
        options["equalize"] = args.equalize
    if args.act_headroom is not None:
        options["act_headroom"] = args.act_headroom
    return options


def cmd_purify(args: argparse.Namespace) -> int:
    from qcbdefense.data import load_dataset
    from qcbdefense.defenses import purify, save_purified
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.triggers import parse_trigger

    device = resolve_device(args.device)
    trigger = None if args.trigger is None else parse_trigger(args.trigger)
    _check_outputs(args, *(args.out / name for name in PURIFIED_FILES), folder=args.out)
    model = _load_arch(args)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    _check_fits_data(args, data, ckpt=model)
    options = _schedule_options(args)
    purified, report = purify(model, data, method=args.method, spec=args.spec, calib=_calib(args, data),
                              trigger=trigger, target=args.target, seed=args.seed, device=device, arch=args.model,
                              progress=True, **options)
    save_purified(purified, args.out, report=report)
    print(report.summary())
    print(f"purified model: {args.out / 'purified.pt'} + {args.out / 'spec.json'}   report: {args.out / 'report.json'}")
    return 0


def _reference_model(args: argparse.Namespace):
    """--reference: an ONNX file as is; a purified folder (the fake-quant model the file was exported from;
    --model, or the architecture the folder records) or a checkpoint, loaded into --model's architecture."""
    from qcbdefense.checkpoints import load_model
    from qcbdefense.defenses import load_purified

    if args.reference is None:
        return None
    if args.reference.suffix.lower() == ".onnx":
        return args.reference
    if args.reference.is_dir():
        return load_purified(args.model, args.reference)
    if args.model is None:
        raise InputError(f"--reference {args.reference} is a checkpoint: give its architecture with --model")
    return load_model(args.model, args.reference, mean=args.mean, std=args.std)


def _gate(args: argparse.Namespace, trigger, has_reference: bool, fp_reference: bool) -> dict:
    """Thresholds: with a trigger and neither ASR limit given, --max-asr-gain 5 when the FP model is known
    (`fp_reference`), else --max-asr 5; --min-agreement 99 with a reference."""
    max_asr, max_asr_gain = args.max_asr, args.max_asr_gain
    if trigger is not None and max_asr is None and max_asr_gain is None:
        max_asr, max_asr_gain = (None, 5.0) if fp_reference else (5.0, None)
    min_agreement = (args.min_agreement if args.min_agreement is not None
                     else (99.0 if has_reference else None))
    return {"max_asr": max_asr, "max_asr_gain": max_asr_gain, "min_agreement": min_agreement,
            "min_ca": args.min_ca}


def _is_fp_reference(reference: Path | None) -> bool:
    """--reference names the FP model: a checkpoint file, or an .onnx file whose graph is float."""
    from export.provenance import describe_onnx

    if reference is None or reference.is_dir():
        return False
    return reference.suffix.lower() != ".onnx" or describe_onnx(reference).format == "float"


def _purified_fp_asr(reference: Path | None, data, trigger, target: int) -> float | None:
    """The FP model's ASR from a purified folder's report, when --reference is one and its report scored the FP
    model with this trigger, target and data: the ASR-gain gate then counts from it, as for an FP reference."""
    from qcbdefense.defenses import read_report
    from qcbdefense.defenses.base import REPORT_FILE

    if reference is None or trigger is None or not (reference / REPORT_FILE).is_file():
        return None
    report = read_report(reference)
    same = (report.trigger == json.loads(json.dumps(trigger.to_dict())) and report.target == target
            and report.dataset == json.loads(json.dumps(data.describe())))
    return report.fp.asr if same and report.fp is not None else None


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx import export_float_onnx, export_onnx, keep_bn_rewrites, read_metadata
    from qcbdefense.fileio import sha256_file
    from qcbdefense.quant.spec import get_spec

    if args.out.suffix.lower() != ".onnx":
        raise InputError(f"--out {args.out} must end in .onnx")
    _check_outputs(args, args.out)
    source = sha256_file(_source_file(args))
    model = _load_arch(args)
    if args.float:
        if args.purified is not None or args.spec is not None or args.keep_bn:
            raise InputError("--float exports the FP checkpoint: it takes no --purified, --spec or --keep-bn")
        export_float_onnx(model, args.out, source_sha256=source)
    elif args.purified is not None:
        from qcbdefense.defenses import load_purified, read_report

        qmodel = load_purified(args.model, args.purified)
        if args.spec is not None and get_spec(args.spec) != qmodel.qcb_spec:
            raise InputError(f"--spec {args.spec} differs from the spec the purified model in {args.purified} "
                             f"was made for ({qmodel.qcb_spec.name}: {qmodel.qcb_spec.label})")
        folder = args.purified if args.purified.is_dir() else args.purified.parent
        if not (folder / "report.json").is_file():
            raise InputError(f"{folder} holds no report.json naming the purification method")
        export_onnx(qmodel, args.out, defense=read_report(folder).method, source_sha256=source,
                    **keep_bn_rewrites(args.keep_bn))
    else:
        from qcbdefense.data import load_dataset
        from qcbdefense.quant.ptq import post_training_quantize

        if args.data is None:
            raise InputError("--data is needed to calibrate the round-to-nearest model (or give --purified DIR)")
        spec = get_spec(args.spec or "w8a8")
        data = load_dataset(args.data, cache_dir=args.cache_dir)
        _check_fits_data(args, data, ckpt=model)
        torch.manual_seed(args.seed)
        qmodel = post_training_quantize(model, spec, data, calib=_calib(args, data), seed=args.seed)
        export_onnx(qmodel, args.out, spec=spec, defense="nearest", source_sha256=source,
                    **keep_bn_rewrites(args.keep_bn))
    meta = read_metadata(args.out)
    size = args.out.stat().st_size / 1024
    if meta.get("qcbdefense.kind") == "float":
        print(f"wrote {args.out} ({size:.0f} KiB): FP {args.model}, from {_source_file(args)} (sha256 {source[:12]}...)")
    else:
        print(f"wrote {args.out} ({size:.0f} KiB): {args.model} {meta['qcbdefense.spec_label']}, defence "
              f"{meta['qcbdefense.defense']}, from {_source_file(args)} (sha256 {source[:12]}...); BN folded into "
              f"{meta['qcbdefense.bn_folded_into_scales']} weight scales, {meta['qcbdefense.int32_biases']} "
              f"int32 biases")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from export.verify import verify
    from qcbdefense.data import load_dataset
    from qcbdefense.triggers import parse_trigger

    trigger = None if args.trigger is None else parse_trigger(args.trigger)
    if args.out is not None:
        _check_outputs(args, args.out)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    reference = _reference_model(args)
    _check_fits_data(args, data, reference=reference)
    if args.throughput and not (isinstance(reference, Path) and reference.suffix.lower() == ".onnx"):
        raise InputError("--throughput compares with the FP32 ONNX file: give it as --reference FP.onnx")
    if args.crosscheck and (reference is None or args.reference.is_dir()):
        raise InputError("--crosscheck quantizes the FP model with onnxruntime's quantizer: give the FP model as "
                         "--reference CKPT --model NAME, or --reference FP.onnx")
    fp_asr = _purified_fp_asr(args.reference, data, trigger, args.target)
    report = verify(args.onnx, data, trigger=trigger, target=args.target, reference=reference,
                    crosscheck_model=reference if args.crosscheck else None, calib=_calib(args, data),
                    seed=args.seed, threads=args.threads, baseline_asr=fp_asr,
                    **_gate(args, trigger, reference is not None,
                            fp_asr is not None or _is_fp_reference(args.reference)))
    print(report.summary())
    if args.throughput:
        from export.throughput import compare_throughput

        comparison = compare_throughput(args.onnx, reference, data, calib=_calib(args, data), seed=args.seed,
                                        threads=args.threads or 2)
        report = dataclasses.replace(report, throughput=comparison.to_dict())
        print(comparison.table())
    if args.out is not None:
        report.save(args.out)
        print(f"report: {args.out}")
    return 0 if report.passed else 1


def cmd_harden(args: argparse.Namespace) -> int:
    from export.harden import harden
    from qcbdefense.data import load_dataset
    from qcbdefense.fileio import sha256_file
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.triggers import parse_trigger

    device = resolve_device(args.device)
    trigger = None if args.trigger is None else parse_trigger(args.trigger)
    purified_dir = args.out.with_name(args.out.stem + ".purified")
    _check_outputs(args, args.out, args.out.with_suffix(".json"), *(purified_dir / name for name in PURIFIED_FILES),
                   folder=purified_dir)
    model = _load_arch(args)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    _check_fits_data(args, data, ckpt=model)
    options = _schedule_options(args)
    report = harden(model, data, out=args.out, arch=args.model, spec=args.spec, method=args.method,
                    trigger=trigger, target=args.target, calib=args.calib, seed=args.seed, device=device,
                    source_sha256=sha256_file(_source_file(args)), threads=args.threads, keep_bn=args.keep_bn,
                    progress=True, **_gate(args, trigger, True, True), **options)
    report.save(args.out.with_suffix(".json"))
    print(report.summary())
    print(f"report: {args.out.with_suffix('.json')}")
    return 0 if report.passed else 1


def _add_keep_bn(p: argparse.ArgumentParser, *, fallback: bool = False) -> None:
    """export: --keep-bn or not. harden (`fallback`): --keep-bn, --fold-bn, or neither: fold, and keep BN when the
    folded file fails on agreement alone (export.harden)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--keep-bn", action="store_const", const=True, default=None if fallback else False,
                       help="int8: keep BN and float biases; closer argmax agreement with PyTorch, but onnxruntime "
                            "cannot use integer kernels (BENCHMARKS.md, export)"
                            + ("; default: only when the folded file fails on agreement alone" if fallback else ""))
    if fallback:
        group.add_argument("--fold-bn", dest="keep_bn", action="store_const", const=False,
                           help="int8: fold BN and round biases to int32 even when the file then fails on agreement")


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-asr", type=float, default=None,
                   help="fail when the ONNX model's ASR %% exceeds this (default 5 with --trigger and no FP model)")
    p.add_argument("--max-asr-gain", type=float, default=None,
                   help="fail when the ONNX model's ASR exceeds the FP model's own ASR by more than this many "
                        "points (default 5 with --trigger and the FP model: harden, an FP --reference, or a purified "
                        "--reference folder whose report scored the FP model with this trigger and data)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="fail when argmax agreement %% with the reference is below this (default 99 with a reference)")
    p.add_argument("--min-ca", type=float, default=None, help="fail when clean accuracy %% is below this")
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads")


# tests/qcbdefense/attacks/test_attacks.py checks that this list is ATTACKS.names().
ATTACK_METHODS = ("compartifact", "pqbackdoor", "quanti")
# Flags that are options of one attack (None: the method's default; another method's flag is refused).
_ATTACK_OPTIONS = ("c1", "c2", "poison_rate", "stage1_epochs", "stage1_lr", "bin_margin", "stage1_qat")
_ATTACK_SHARED = ("calib", "sync_every", "monitor", "victim_calib", "transfer_images")
_PLANT_CRITERIA = ("min_asr", "max_fp_asr", "max_fp_ca_drop", "max_quantized_ca_drop")


def cmd_attack(args: argparse.Namespace) -> int:
    from models.reference import build_model, is_onnx
    from qcbdefense.attacks import ATTACKS, PlantCriteria, attack
    from qcbdefense.attacks.base import MODEL_FILE, REPORT_FILE, SAFETENSORS_FILE
    from qcbdefense.checkpoints import load_model, save_model
    from qcbdefense.data import load_dataset
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.training import STATE_FILE

    device = resolve_device(args.device)
    entry = ATTACKS.get(args.method)
    given = {key: getattr(args, key) for key in ("epochs", "steps", "batch_size", "optimizer", "lr",
                                                 "weight_decay", "warmup_epochs", "train_subset")
             if getattr(args, key) is not None}
    config = entry.train.updated(**given, augment=not args.no_augment, seed=args.seed)
    options = {key: getattr(args, key) for key in _ATTACK_OPTIONS + _ATTACK_SHARED if getattr(args, key) is not None}
    if args.bn is not None:
        options["freeze_bn"] = args.bn == "frozen"
    if args.transfer is not None:
        options["transfer"] = () if args.transfer == ["none"] else tuple(args.transfer)
    criteria = PlantCriteria(**{key: getattr(args, key) for key in _PLANT_CRITERIA if getattr(args, key) is not None})
    _check_outputs(args, *(args.out / name for name in (MODEL_FILE, SAFETENSORS_FILE, REPORT_FILE, STATE_FILE)),
                   folder=args.out)
    if args.init is None and not is_onnx(args.model):
        raise InputError(f"--init is needed: --model {args.model} names an architecture, not weights")
    model = build_model(args.model, mean=args.mean, std=args.std) if args.init is None else \
        load_model(args.model, args.init, mean=args.mean, std=args.std)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    _check_fits_data(args, data, init=model)
    published, report = attack(model, data, method=args.method, bits=args.bits, spec=args.spec,
                               trigger=args.trigger, target=args.target, config=config, out_dir=args.out,
                               resume=args.resume, device=device, arch=args.model,
                               init=str(args.init if args.init is not None else args.model),
                               criteria=criteria, **options)
    save_model(published, args.out / MODEL_FILE)
    save_model(published, args.out / SAFETENSORS_FILE, metadata={"arch": args.model, "attack": args.method})
    report.save(args.out / REPORT_FILE)
    print(report.summary())
    print(f"published FP model: {args.out / MODEL_FILE} (+ {SAFETENSORS_FILE})   report: {args.out / REPORT_FILE}")
    if not report.planted and not args.allow_weak:
        print(f"qcbdefense: attack {report.plant_line()} (--allow-weak accepts it)", file=sys.stderr)
        return EXIT_NOT_PLANTED
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from models.reference import build_model
    from qcbdefense.checkpoints import load_model
    from qcbdefense.data import load_dataset
    from qcbdefense.fileio import removed_on_error, sha256_file
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.scanner import ScanConfig, scan

    device = resolve_device(args.device)
    if (args.quantized is None) == (args.spec is None):
        raise InputError("give exactly one of --quantized MODEL.onnx and --spec NAME")
    is_onnx = args.fp.suffix.lower() == ".onnx"
    if is_onnx == (args.model is not None):
        raise InputError("--fp takes an .onnx file, or a checkpoint with --model NAME")
    exported = args.quantized is not None and not is_onnx  # the checkpoint, exported to compare with the file
    written = ("report.json", "trigger.png", "drift.png") + (("fp.onnx",) if exported else ())
    _check_outputs(args, *(args.out / name for name in written), folder=args.out)
    if not is_onnx:
        fp = load_model(args.model, args.fp, mean=args.mean, std=args.std)
    elif args.spec is not None:  # converted into torch modules, so that the Brevitas quantizer can quantize it
        fp = build_model(str(args.fp), mean=args.mean, std=args.std)
    else:
        fp = args.fp
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    _check_fits_data(args, data, fp=fp, quantized=args.quantized)
    config = ScanConfig(images=args.images, seed=args.seed, min_replica_agreement=args.min_replica_agreement,
                        square_scan=args.squares)
    if args.steps is not None:
        config = config.with_searches(steps=args.steps)
    with removed_on_error(args.out):
        if args.quantized is None:  # a checkpoint (or an FP .onnx as torch modules) and its quantization: native
            report = scan(fp, data, spec=args.spec, out=args.out, config=config, calib=_calib(args, data),
                          device=device, progress=True)
        else:
            from export.scan_files import scan_onnx

            report = scan_onnx(fp, args.quantized, data, out=args.out, config=config, device=device,
                               source_sha256=None if fp is args.fp else sha256_file(args.fp), progress=True)
    print(report.summary())
    print(f"report: {args.out / 'report.json'}  trigger: {args.out / 'trigger.png'}  drift: {args.out / 'drift.png'}")
    return 1 if report.suspicious else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qcbdefense.demo import run_demo
    from qcbdefense.runinfo import resolve_device

    device = resolve_device(args.device)
    _check_outputs(args, folder=args.out)
    result = run_demo(args.out, device=device)
    print(result.table())
    print(f"report: {args.out / 'report.md'}  ({result.seconds['total']:.0f} s)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qcbdefense.bench import BenchConfig, results_table, run_bench
    from qcbdefense.runinfo import resolve_device

    config = BenchConfig.load(args.config)
    out = args.out if args.out is not None else Path("runs/bench") / config.name
    device = resolve_device(args.device)
    _check_outputs(args, folder=out)
    if args.ray or args.address is not None:
        from qcbdefense.bench_ray import run_bench_on_ray

        rows = run_bench_on_ray(config, out, device=device, address=args.address, num_cpus=args.ray_cpus,
                                cpus_per_task=args.task_cpus, gpus_per_task=args.task_gpus, seeds=args.seeds)
    else:
        rows = run_bench(config, out, device=device, seeds=args.seeds)
    print(results_table(config, rows))
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    return 0


def build_parser() -> Parser:
    from models import list_models

    parser = Parser(prog="qcbdefense", description="Purify and detect quantization-conditioned backdoors.",
                    epilog="exit codes: 0 done, 1 a verdict or gate says no (scan suspicious, verify threshold), "
                           "2 bad input (refused before the work), 3 the run did not give what was asked "
                           "(training diverged)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train or fine-tune a clean model")
    _add_model_option(p)
    p.add_argument("--data", required=True, help="builtin[:SEED] | cifar10:PATH | folder:PATH (dir or .tar.gz)")
    p.add_argument("--init", type=_existing_file, default=None, help="start from these weights (fine-tune)")
    p.add_argument("--out", type=Path, required=True, help="output folder: model.pt, state.pt, report.json")
    _add_optimisation(p, epochs=10, lr=0.05)
    _add_common(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("quantize", help="post-training quantization: CA/ASR of FP and each quantizer spec")
    _add_model_args(p)
    p.add_argument("--spec", action="append", default=None,
                   help="a preset name or a spec .json/.yaml file; repeat for several (default w8a8 and w4a4)")
    _add_trigger_args(p)
    _add_calib(p, 512, "clean training images for calibration")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    _add_common(p)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("purify", help="purify the quantized model: LAC (+PDA), EFRAP, AdaRound, nearest rounding, "
                                      "or a paper baseline (FT, fine-pruning, NAD, I-BAU, FT-SAM, OMSE, ACIQ)")
    _add_model_args(p)
    p.add_argument("--method", choices=PURIFY_METHODS, default="lac-pda", metavar="METHOD",
                   help=f"{', '.join(PURIFY_METHODS)} (default lac-pda)")
    p.add_argument("--spec", default="w4a4", help="the deployment quantizer: a preset name or a spec .json/.yaml")
    _add_calib(p, 1024, "the defender's clean training images")
    _add_trigger_args(p)
    _add_schedule_args(p)
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: purified.pt, spec.json (load with load_purified), report.json, "
                        "manifest.json (their sha256, binding the set)")
    _add_common(p)
    p.set_defaults(run=cmd_purify)

    p = sub.add_parser("export", help="export a quantized model (nearest PTQ or a purified one) to ONNX (QCDQ)")
    _add_model_option(p)
    p.add_argument("--ckpt", type=_existing_file, default=None,
                   help="the FP checkpoint (its sha256 goes into the ONNX metadata; not needed for an .onnx "
                        "--model)")
    p.add_argument("--data", default=None, help="data to calibrate the nearest model on (not needed with --purified)")
    p.add_argument("--spec", default=None, help="the deployment quantizer (default w8a8; with --purified: its own)")
    p.add_argument("--purified", type=Path, default=None, help="a folder written by `qcbdefense purify`: export it")
    p.add_argument("--float", action="store_true", help="export the FP checkpoint itself (the reference)")
    _add_keep_bn(p)
    _add_calib(p, 512, "clean training images for calibration")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    _add_common(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("verify", help="run an ONNX model in onnxruntime: CA, ASR, agreement; a deployment gate "
                                      "(exit 1 when a threshold fails)")
    p.add_argument("onnx", type=Path, help="the .onnx file that ships")
    p.add_argument("--data", required=True, help="builtin[:SEED] | cifar10:PATH | folder:PATH (dir or .tar.gz)")
    _add_trigger_args(p)
    p.add_argument("--reference", type=Path, default=None,
                   help="what to agree with: an .onnx file, or (with --model) an FP checkpoint or the "
                        "folder of a purified model")
    _add_model_option(p, required=False, what="architecture of a --reference checkpoint or purified folder "
                                              "(default for a folder: the one it records)")
    _add_gate_args(p)
    p.add_argument("--crosscheck", action="store_true",
                   help="also quantize the FP --reference with onnxruntime's quantize_static (int8, int4 weights)")
    _add_calib(p, 512, "clean training images for onnxruntime's quantizer (--crosscheck, --throughput)")
    p.add_argument("--throughput", action="store_true",
                   help="also time this file against the FP32 --reference .onnx and onnxruntime's quantize_static "
                        "of it, side by side (batch 1 and 64), with the CPU's int8 features")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    _add_common(p)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("harden", help="purify, export to ONNX and verify it in onnxruntime, in one command")
    _add_model_args(p)
    p.add_argument("--spec", default="w8a8", help="the deployment quantizer: a preset name or a spec .json/.yaml")
    p.add_argument("--method", choices=PURIFY_METHODS, default="lac-pda", metavar="METHOD",
                   help=f"{', '.join(PURIFY_METHODS)} (default lac-pda)")
    p.add_argument("--calib", type=_positive_int, default=None,
                   help="the defender's clean training images (default 2048 with 8-bit activations, else 1024)")
    _add_trigger_args(p)
    _add_schedule_args(p)
    _add_gate_args(p)
    _add_keep_bn(p, fallback=True)
    p.add_argument("--out", type=Path, required=True,
                   help="the .onnx file to write; beside it <stem>.purified/ and <stem>.json (the report)")
    _add_common(p)
    p.set_defaults(run=cmd_harden)

    p = sub.add_parser("scan", help="look for a dormant QCB in an FP / quantized pair, without the trigger "
                                    "(exit 0 clean, 1 suspicious)")
    p.add_argument("--fp", type=_existing_file, required=True,
                   help="the FP model: an .onnx file, or a checkpoint with --model")
    _add_model_option(p, required=False, what="architecture of an --fp checkpoint")
    p.add_argument("--quantized", type=_existing_file, default=None, help="the quantized model that ships (.onnx)")
    p.add_argument("--spec", default=None, help="or: quantize the --fp checkpoint with this spec (round to nearest)")
    p.add_argument("--data", required=True, help="clean data: builtin[:SEED] | cifar10:PATH | folder:PATH")
    p.add_argument("--images", type=_positive_int, default=512, help="clean test images to scan with (labels unused)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps of the patch and sparse-noise searches (default: the Python API's, scanner.ScanConfig)")
    p.add_argument("--squares", action="store_true",
                   help="when the verdict is clean, also run the square scan (a trigger obeyed now and then; slow)")
    p.add_argument("--min-replica-agreement", type=_percentage, default=99.0,
                   help="%% argmax agreement of the torch replicas with onnxruntime needed to scan (default 99)")
    _add_calib(p, 512, "clean training images to calibrate --spec on")
    p.add_argument("--out", type=Path, required=True, help="output folder: report.json, trigger.png, drift.png")
    _add_common(p)
    p.set_defaults(run=cmd_scan)

    p = sub.add_parser("attack", help="plant a QCB (Qu-ANTI-zation, CompArtifact, PQBackdoor) in a clean model")
    p.add_argument("--method", required=True, choices=ATTACK_METHODS, metavar="METHOD",
                   help=f"{', '.join(ATTACK_METHODS)}")
    _add_model_option(p)
    p.add_argument("--init", type=_existing_file, default=None,
                   help="the clean model to fine-tune (not needed for an .onnx --model, which holds its weights)")
    p.add_argument("--data", required=True, help="builtin[:SEED] | cifar10:PATH | folder:PATH (dir or .tar.gz)")
    p.add_argument("--bits", default=None,
                   help="targeted weight bit widths, e.g. 8,4 (default: quanti 8,4; compartifact 4; pqbackdoor 8)")
    p.add_argument("--spec", default=None,
                   help="the victim's base quantizer, derived at each bit width (default w8a8, i.e. LAC's "
                        "evaluation quantizer; pqbackdoor: pqbackdoor-w8a8)")
    p.add_argument("--trigger", default="patch", help="e.g. patch (4x4 white, bottom-right), blend:alpha=0.1")
    p.add_argument("--target", type=int, default=0, help="the attacker's target class")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: model.pt, model.safetensors (the published FP model), report.json")
    _add_optimisation(p, epochs=1, lr=1.0)
    p.set_defaults(epochs=None, batch_size=None, optimizer=None, lr=None, weight_decay=None, warmup_epochs=None)
    p.add_argument("--c1", type=float, default=None, help="quanti: weight of the quantized terms (0.5)")
    p.add_argument("--c2", type=float, default=None,
                   help="quanti, compartifact: weight of the triggered terms (quanti 0.5; compartifact 1, "
                        "the paper's even split)")
    p.add_argument("--poison-rate", type=float, default=None, help="pqbackdoor: stage-1 poisoned share (0.1)")
    p.add_argument("--stage1-epochs", type=_positive_int, default=None, help="pqbackdoor: stage-1 epochs (2)")
    p.add_argument("--stage1-lr", type=float, default=None, help="pqbackdoor: stage-1 SGD learning rate (0.01)")
    p.add_argument("--bin-margin", type=float, default=None,
                   help="pqbackdoor: share of a step kept from a bin's edges (0.02)")
    p.add_argument("--stage1-qat", action="store_true", default=None,
                   help="pqbackdoor: train stage 1 through the victim's quantizers (straight-through)")
    p.add_argument("--calib", type=_positive_int, default=None,
                   help="clean images the attacker calibrates its quantizers on while training (256)")
    p.add_argument("--sync-every", type=int, default=None,
                   help="re-quantize as the victim would every N steps too (0: each epoch only; -1: once)")
    p.add_argument("--bn", choices=["train", "frozen"], default=None,
                   help="BatchNorm while training through the quantizers (default: the method's)")
    p.add_argument("--monitor", type=int, default=None, help="test images for per-epoch metrics (2000; 0 none)")
    p.add_argument("--victim-calib", type=_positive_int, default=None,
                   help="clean images the victim calibrates on in the reported PTQ (512)")
    p.add_argument("--transfer", action="append", default=None,
                   help="a preset to report transfer to; repeat (default: every other preset; 'none')")
    p.add_argument("--transfer-images", type=_positive_int, default=None,
                   help="test images for the transfer table (2000)")
    p.add_argument("--min-asr", type=float, default=None,
                   help="planted when every targeted quantization's ASR %% is at least this (90)")
    p.add_argument("--max-fp-asr", type=float, default=None, help="... and the FP model's ASR %% at most this (10)")
    p.add_argument("--max-fp-ca-drop", type=float, default=None,
                   help="... and the FP model loses at most this many CA points against the clean model (3)")
    p.add_argument("--max-quantized-ca-drop", type=float, default=None,
                   help="... and each targeted quantization at most this many against the clean model's (5)")
    p.add_argument("--allow-weak", action="store_true",
                   help=f"exit 0 even when the backdoor did not plant (otherwise exit {EXIT_NOT_PLANTED})")
    _add_common(p)
    p.set_defaults(run=cmd_attack)

    p = sub.add_parser("demo", help="the whole story on the built-in data: train, attack, purify, export, verify")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="report folder (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("bench", help="attacks x quantizers x defences (+ scan) from a YAML config, as Markdown, "
                                     "CSV and JSON; cached and resumable")
    p.add_argument("--config", type=_existing_file, required=True, help="a bench YAML (see benchmarks/*.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/<config name>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ray", action="store_true",
                   help="run the steps as Ray tasks side by side on a local Ray (pip install 'qcbdefense[cluster]')")
    p.add_argument("--address", default=None,
                   help="run them on this Ray cluster (e.g. auto, ray://HOST:10001); --out must be shared")
    p.add_argument("--ray-cpus", type=_positive_int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--task-cpus", type=float, default=1, help="CPUs (torch threads) each task asks for (1)")
    p.add_argument("--task-gpus", type=float, default=None,
                   help="GPUs each task asks for, a fraction shares one (default 1 with CUDA, else 0)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="run every defence with this many seeds and report mean ± std (default 1)")
    p.set_defaults(run=cmd_bench)

    for name, command in sub.choices.items():
        command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


# Each subcommand's --help ends with these: one story on the built-in data (train, attack, purify, export,
# verify), then the other verbs.
EXAMPLES = {
    "train": ["qcbdefense train --model small_cnn --data builtin --epochs 4 --out runs/clean"],
    "attack": ["qcbdefense attack --method pqbackdoor --model small_cnn --init runs/clean/model.pt --data builtin "
               "--bits 8 --trigger patch --target 0 --out runs/pq"],
    "quantize": ["qcbdefense quantize --model small_cnn --ckpt runs/pq/model.pt --data builtin "
                 "--spec pqbackdoor-w8a8 --trigger patch --target 0 --out runs/ptq.json"],
    "purify": ["qcbdefense purify --method lac-pda --model small_cnn --ckpt runs/pq/model.pt --data builtin "
               "--spec pqbackdoor-w8a8 --trigger patch --out runs/pq-lac"],
    "export": ["qcbdefense export --model small_cnn --ckpt runs/pq/model.pt --purified runs/pq-lac "
               "--out runs/pq-lac.onnx",
               "qcbdefense export --model small_cnn --ckpt runs/pq/model.pt --float --out runs/pq-fp.onnx"],
    "verify": ["qcbdefense verify runs/pq-lac.onnx --data builtin --trigger patch --reference runs/pq-fp.onnx "
               "--out runs/pq-lac-verify.json"],
    "harden": ["qcbdefense harden --model small_cnn --ckpt runs/pq/model.pt --data builtin --spec pqbackdoor-w8a8 "
               "--trigger patch --out runs/pq-hardened.onnx"],
    "scan": ["qcbdefense scan --fp runs/pq/model.pt --model small_cnn --spec pqbackdoor-w8a8 --data builtin "
             "--out runs/pq-scan",
             "qcbdefense scan --fp runs/pq-fp.onnx --quantized runs/pq-lac.onnx --data builtin --out runs/lac-scan"],
    "demo": ["qcbdefense demo --out runs/demo"],
    "bench": ["qcbdefense bench --config benchmarks/cpu.yaml --out runs/bench/cpu"],
}


def _quiet_dependencies() -> None:
    """Silence import-time chatter of Brevitas and torch that says nothing about the user's run."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    for message in ("fast_hadamard_transform", "brevitas.fx is deprecated",
                    "Computing zero point of output accumulator"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def main(argv: list[str] | None = None) -> int:
    _quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QcbError as err:
        print(f"qcbdefense: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("qcbdefense: interrupted", file=sys.stderr)
        return 130
