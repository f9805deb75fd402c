"""Model references: the one place that turns `--model` (the Python API's `arch`) into a model.

    NAME                      a zoo model (`models.list_models()`)
    torchvision:NAME          `torchvision.models.get_model(NAME, weights=None, num_classes=...)`; no download
    timm:NAME                 `timm.create_model(NAME, pretrained=False, num_classes=...)`, when timm is
                              installed (an optional extra)
    PACKAGE.MODULE:CALLABLE   the user's own code: `CALLABLE(num_classes=...)` must return an nn.Module
    PATH.onnx                 an FP ONNX classifier, converted into torch modules (`models.onnx_import`) and
                              checked against onnxruntime; it brings its own weights and class count

A torchvision, timm or user reference may end in keyword arguments for its builder, literal values only:
`torchvision:efficientnet_b0(stochastic_depth_prob=0.0,dropout=0.0)` (EfficientNet-B0 at 32x32 with
torchvision's stochastic depth and dropout stays at chance after 4 epochs on the built-in data; without
them it trains). They are part of the reference, recorded with it, so the model is rebuilt the same way.

Every model takes pixels in [0, 1] (models/normalize.py): zoo models normalise in their first module; the
other references are wrapped in `Normalized` (mean/std default to CIFAR's; a checkpoint's `normalize.*`
buffers override them), except an ONNX file, which takes pixels as our own exports do unless mean/std
are given (a file that expects normalised input). The built model carries its reference as `qcb_model_ref`
(an ONNX path made absolute), which `save_purified` records so that `load_purified` rebuilds the model.

Examples:
    >>> model = build_model("torchvision:resnet18", num_classes=10)      # doctest: +SKIP
    >>> model.qcb_model_ref
    'torchvision:resnet18'
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from models import create_model
from models.normalize import CIFAR_MEAN, CIFAR_STD, Normalized
from models.registry import MODELS
from qcbdefense.errors import InputError, first_line

DEFAULT_CLASSES = 10
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_ARGUMENTS = re.compile(r"^(?P<base>[^()]+)\((?P<args>.*)\)$", re.S)
FORMS = ("a zoo name, torchvision:NAME, timm:NAME, PACKAGE.MODULE:CALLABLE (these three optionally with builder "
         "arguments: NAME(KEY=VALUE,...)) or an FP .onnx file")


def is_onnx(ref: str) -> bool:
    return str(ref).lower().endswith(".onnx")


def canonical(ref: str) -> str:
    """The reference as it is recorded: an ONNX path made absolute (a report may be read from elsewhere)."""
    return str(Path(ref).resolve()) if is_onnx(ref) else str(ref)


def check_reference(ref: str) -> str:
    """InputError unless `ref` has one of the accepted forms (cheap: imports and reads nothing)."""
    ref = str(ref)
    base, arguments = split_arguments(ref)
    if arguments and (base in MODELS or is_onnx(base)):
        raise InputError(f"--model {ref}: builder arguments apply to torchvision:, timm: and "
                         f"PACKAGE.MODULE:CALLABLE models only")
    if base in MODELS or is_onnx(base) or base.startswith(("torchvision:", "timm:")) or _CALLABLE.match(base):
        return ref
    raise InputError(f"unknown model {ref!r}; give {FORMS} (zoo: {', '.join(MODELS.names())})")


def split_arguments(ref: str) -> tuple[str, dict]:
    """`NAME(KEY=VALUE,...)` as NAME and its keyword arguments (literals, read by `ast.literal_eval`: nothing is
    executed); a reference without them as itself and {}."""
    match = _ARGUMENTS.match(ref)
    if is_onnx(ref) or (match is None and "(" not in ref):
        return ref, {}
    try:
        call = ast.parse(f"f({match['args']})", mode="eval").body if match else None
    except SyntaxError:
        call = None
    if call is None:
        raise InputError(f"--model {ref}: cannot read its builder arguments; write NAME(KEY=VALUE,...)") from None
    if call.args or any(k.arg is None for k in call.keywords):
        raise InputError(f"--model {ref}: builder arguments are KEY=VALUE pairs only")
    arguments = {}
    for keyword in call.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise InputError(f"--model {ref}: {keyword.arg} must be a literal (a number, string, True, False "
                             f"or None)") from None
    if "num_classes" in arguments:
        raise InputError(f"--model {ref}: the class count comes from the data (or the checkpoint), not the "
                         f"reference")
    return match["base"].strip(), arguments


def build_model(ref: str, *, num_classes: int | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> nn.Module:
    """A fresh model for the reference `ref` (see the module docstring), in eval mode, with `qcb_model_ref`.

    num_classes: None is the default (10), or the ONNX file's own count; an ONNX file with another count
    raises InputError. mean/std: the input statistics (None: CIFAR's; for an ONNX file: no normalisation).
    """
    ref = check_reference(ref)
    if num_classes is not None and num_classes < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}")
    if ref in MODELS:
        model = create_model(ref, num_classes=num_classes or DEFAULT_CLASSES, mean=mean or CIFAR_MEAN,
                             std=std or CIFAR_STD)
    elif is_onnx(ref):
        from models.onnx_import import import_onnx

        model = import_onnx(ref)
        classes = num_classes_of(model)
        if num_classes is not None and classes is not None and classes != num_classes:
            raise InputError(f"ONNX model {ref} has {classes} classes, not {num_classes}")
        if mean is not None or std is not None:
            model = Normalized(model, mean or CIFAR_MEAN, std or CIFAR_STD)
    else:
        net = _outside_model(ref, num_classes or DEFAULT_CLASSES)
        model = Normalized(net, mean or CIFAR_MEAN, std or CIFAR_STD)
    model.qcb_model_ref = canonical(ref)
    return model.eval()


def model_for_state(ref: str, state: Mapping[str, torch.Tensor], *, num_classes: int | None = None,
                    mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model of `ref` that the state_dict `state` is meant for, and the state keyed for it.

    The class count is read from the state's classifier (the model's last nn.Linear) unless given. An
    outside model's checkpoint saved without our Normalize wrapper (plain torchvision keys) gets the `net.`
    prefix; an ONNX model whose state has `net.` keys was normalised (mean/std given) and is wrapped again.
    """
    state = dict(state)
    wrapped = any(key.startswith("net.") for key in state)
    if is_onnx(ref) and wrapped and mean is None and std is None:
        mean, std = CIFAR_MEAN, CIFAR_STD  # placeholders: the state's normalize.* buffers hold the values
    model = build_model(ref, num_classes=num_classes, mean=mean, std=std)
    if isinstance(model, Normalized) and not wrapped:
        state = {f"net.{key}": value for key, value in state.items()}
    if num_classes is None and not is_onnx(ref):
        head = classifier_name(model)
        weight = state.get(f"{head}.weight") if head else None
        if weight is not None and weight.ndim == 2 and weight.shape[0] != model.get_submodule(head).out_features:
            model = build_model(ref, num_classes=int(weight.shape[0]), mean=mean, std=std)
    return model, state


def model_reference(model: nn.Module) -> str | None:
    """The reference a model was built from (None for a model built elsewhere)."""
    return getattr(model, "qcb_model_ref", None)


def _outside_model(ref: str, num_classes: int) -> nn.Module:
    base, arguments = split_arguments(ref)
    source, name = base.split(":", 1)
    try:
        return _build_outside(ref, source, name, num_classes, arguments)
    except TypeError as err:  # a builder argument the builder does not take
        if not arguments:
            raise
        raise InputError(f"--model {ref}: {first_line(str(err))}") from None


def _build_outside(ref: str, source: str, name: str, num_classes: int, arguments: dict) -> nn.Module:
    if source == "torchvision":
        import torchvision

        known = torchvision.models.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise InputError(f"unknown torchvision model {name!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else
                                "; see torchvision.models.list_models()"))
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arguments)
    if source == "timm":
        if importlib.util.find_spec("timm") is None:
            raise InputError(f"--model {ref} needs timm, an optional extra: pip install timm")
        import timm

        if not timm.is_model(name):
            raise InputError(f"unknown timm model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **arguments)
    return _user_model(ref, source, name, num_classes, arguments)


def _user_model(ref: str, module_name: str, attr: str, num_classes: int, arguments: dict) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"--model {ref}: cannot import {module_name} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"--model {ref}: {module_name} has no callable {attr!r}")
    try:
        model = factory(num_classes=num_classes, **arguments)
    except Exception as err:  # the user's code may fail in any way; one line says where
        raise InputError(f"--model {ref}: {attr}(num_classes={num_classes}) failed with "
                         f"{type(err).__name__}: {first_line(str(err))}") from err
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {ref}: {attr}(num_classes={num_classes}) returned a "
                         f"{type(model).__name__}, not a torch nn.Module")
    return model


def classifier_name(model: nn.Module) -> str | None:
    """The name of the model's last nn.Linear: the classifier of the zoo's and torchvision's models."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def num_classes_of(model: nn.Module) -> int | None:
    """How many classes a model tells apart: its classifier's outputs (None when it has no nn.Linear)."""
    head = classifier_name(model)
    return model.get_submodule(head).out_features if head else None
