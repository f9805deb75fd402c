"""The `qcbdefense` command: a thin layer over the Python API, one subcommand per verb.

Expected failures (bad paths, unknown names, corrupt files, nonsense options) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

import torch

from qcbdefense.errors import InputError, QcbError

# Subcommands still to come, with the issue that brings each.
PLANNED = {
    "attack": "plant a QCB (Qu-ANTI-zation, CompArtifact, PQBackdoor) against a Brevitas quantizer",
    "purify": "purify a quantized model with LAC (+PDA), EFRAP, AdaRound or nearest rounding",
    "export": "export a quantized model to ONNX (QCDQ)",
    "verify": "check an ONNX model in onnxruntime: CA, ASR, agreement; a deployment gate",
    "scan": "look for a dormant QCB in an FP/quantized pair, with evidence",
    "harden": "purify, export and verify in one command",
    "bench": "attacks x specs x defences, as Markdown/CSV/JSON",
    "demo": "the whole story on the built-in data, in minutes",
}


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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from models import list_models

    p.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                   help=f"architecture: {', '.join(list_models())}")
    p.add_argument("--ckpt", type=_existing_file, required=True,
                   help="weights: a state_dict (.pt/.pth/.th, loaded weights-only) or .safetensors")
    p.add_argument("--data", required=True, help="builtin[:SEED] | cifar10:PATH | folder:PATH (dir or .tar.gz)")


def _add_trigger_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trigger", default=None,
                   help="e.g. patch (4x4 white, bottom-right), patch:size=3,position=top-left, blend:alpha=0.1")
    p.add_argument("--target", type=int, default=0, help="the attacker's target class")


def _add_optimisation(p: argparse.ArgumentParser, *, epochs: int, lr: float, optimizer: str = "sgd",
                      weight_decay: float = 5e-4) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs)
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

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       augment=not args.no_augment, train_subset=args.train_subset, seed=args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from models import create_model
    from qcbdefense.checkpoints import load_model
    from qcbdefense.data import load_dataset
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.train import train

    device = resolve_device(args.device)
    config = _train_config(args)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = load_model(args.model, args.init)
        classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
        if classes != data.num_classes:
            raise InputError(f"--init {args.init} has {classes} classes, the data {args.data} has {data.num_classes}")
    else:
        model = create_model(args.model, num_classes=data.num_classes, mean=data.mean, std=data.std)
    report = train(model, data, config, arch=args.model, out_dir=args.out, resume=args.resume, device=device,
                   init=None if args.init is None else str(args.init))
    print(report.summary())
    print(f"weights: {args.out / 'model.pt'}   report: {args.out / 'report.json'}")
    return 0


def _load_arch(args: argparse.Namespace):
    from qcbdefense.checkpoints import load_model

    return load_model(args.model, args.ckpt)


def cmd_quantize(args: argparse.Namespace) -> int:
    from qcbdefense.data import load_dataset
    from qcbdefense.fileio import write_json
    from qcbdefense.quant.ptq import compare_specs
    from qcbdefense.quant.spec import get_spec
    from qcbdefense.runinfo import resolve_device
    from qcbdefense.triggers import parse_trigger

    device = resolve_device(args.device)
    specs = [get_spec(s) for s in (args.spec or ["w8a8", "w4a4"])]
    trigger = None if args.trigger is None else parse_trigger(args.trigger)
    model = _load_arch(args)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)
    report = compare_specs(model, data, specs, arch=args.model, trigger=trigger, target=args.target,
                           calib=args.calib, seed=args.seed, device=device)
    print(report.table())
    if args.out is not None:
        write_json(args.out, report.to_dict())
        print(f"report: {args.out}")
    return 0


def _planned(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"qcbdefense {name}: not implemented yet ({PLANNED[name]}); see the open issues.", file=sys.stderr)
        return 2

    return run


def build_parser() -> Parser:
    from models import list_models

    parser = Parser(prog="qcbdefense", description="Purify and detect quantization-conditioned backdoors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train or fine-tune a clean model")
    p.add_argument("--model", required=True, choices=list_models(), metavar="NAME",
                   help=f"architecture: {', '.join(list_models())}")
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
    p.add_argument("--calib", type=_positive_int, default=512, help="clean training images for calibration")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    _add_common(p)
    p.set_defaults(run=cmd_quantize)

    for name, help_text in PLANNED.items():
        p = sub.add_parser(name, help=f"{help_text} (not implemented yet)")
        p.set_defaults(run=_planned(name))
    return parser


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
        return 2
    except KeyboardInterrupt:
        print("qcbdefense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
