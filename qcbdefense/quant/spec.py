"""QuantSpec: the exact quantizer a deployment uses, as plain data that prints, diffs and saves.

A quantization-conditioned backdoor fires under one quantizer and may stay dormant under another (per-channel
vs per-tensor, 127 vs 127.5 scaling, 4 vs 8 bits), so every attack, defence and report names its quantizer by
a `QuantSpec`. Only `quant/quantize.py` turns a spec into Brevitas quantizers.

Presets (`SPECS.names()`), by the paper whose quantizer they reproduce:

- `w8a8`, `w4a4`, `w4a8`: the LAC/EFRAP evaluation quantizer (weights per-channel asymmetric with an MSE
  range, activations per-tensor asymmetric with a percentile range, first and last layer weights at 8 bits,
  BN not folded).
- `w8a8-per-tensor`: as `w8a8` with one weight scale per layer.
- `quanti-w8a8`, `quanti-w4a4`: Qu-ANTI-zation (per-layer symmetric weights, scale = absmax / (2^(b-1) - 1),
  per-tensor asymmetric min/max activations, every layer at b bits).
- `pqbackdoor-w8a8`, `pqbackdoor-w4a4`: PQBackdoor's target (PyTorch's per-channel symmetric qint8: scale =
  absmax / (2^(b-1) - 0.5), i.e. /127.5 at 8 bits, integers in [-2^(b-1), 2^(b-1) - 1], every layer at b
  bits). Its activations are per-tensor asymmetric min/max (the paper targets weights; min/max is the plain
  observer of both PyTorch and TFLite).
- `pqbackdoor-w8a8-per-tensor`: as `pqbackdoor-w8a8` with one weight scale per layer (PyTorch's per-tensor
  symmetric qint8, the weight observer of its qnnpack backend).
- `ort-w8a8`: onnxruntime's `quantize_static` with `per_channel=True` (QInt8 weights on [-127, 127], scale =
  absmax / 127 per output channel; min/max activations, the image too). quantize_static folds BN into the
  convs first, and a per-channel symmetric scale commutes with that (BN multiplies a channel and its abs-max
  by one factor), so the integers are the same: a QCB planted against this preset fires in the file a
  deployer makes with quantize_static (BENCHMARKS.md); onnxruntime also quantizes the adds, this preset not.

And the deployment quantizers, for a file onnxruntime runs on integer kernels end to end:

- `w8a8-deploy`, `w4a8-deploy`: per-channel symmetric narrow-range weights (signed integers, zero point 0:
  the fast u8s8 path of onnxruntime's x86 QLinearConv), MSE range; unsigned 8-bit percentile activations;
  and `quantize_adds`: both inputs and the output of every residual add and concat are quantized too, so
  that every conv output, add and pooled feature is an 8-bit tensor (QLinearConv, QLinearAdd,
  QLinearGlobalAveragePool, QGemm). BN stays in the PyTorch model (PDA needs its statistics) and
  `export.onnx` folds it into the weight scales, which keeps the integers.
  Weights are int8 tensors holding 7-bit integers ([-63, 63]; 4-bit in `w4a8-deploy`, whose first and last
  layers are at 7), onnxruntime's `reduce_range`: without VNNI, x86 multiplies u8 by s8 with VPMADDUBSW,
  which saturates each sum of two products at 2^15 - 1, and 2 * 255 * 127 overflows it (2 * 255 * 63
  does not). With 8-bit weights the file's agreement with its PyTorch model depends on the CPU it runs on
  (ResNet-20, CIFAR-10 test set, no VNNI: 99.02 %; 90.7 % with the image at 8 bits too); at 7 bits no sum
  saturates, so the file computes the same integers on every CPU (99.20 %; the rest is not saturation). What a CPU with VNNI loses: one bit of weight precision (speed is the same kernels'). The name
  keeps "w8": int8 kernels and tensors; an attack targets it at 7 bits (`attack --spec w8a8-deploy
  --bits 7`: at `--bits 8` it would target 8-bit weights). `w4a8-deploy` holds 4-bit integers in the same int8 kernels (its
  first layer's input, the image, at 7 bits too): as fast as `w8a8-deploy`, not faster.

Examples:
    >>> get_spec("w4a4").label
    'W4A4 per-channel asym mse, act asym percentile, first/last W8/W8'
    >>> QuantSpec.from_json(get_spec("w4a4").to_json()) == get_spec("w4a4")
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from qcbdefense.errors import InputError, check_number
from qcbdefense.fileio import atomic_path
from qcbdefense.registry import Registry

SPEC_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
# "absmax" and "absmax-half" are symmetric rules, "minmax" is their asymmetric counterpart (scale =
# (max - min) / (2^b - 1) with the range stretched to hold 0), "mse" searches the range for either.
WEIGHT_SCALES = ("absmax", "absmax-half", "minmax", "mse")
SYMMETRIC_WEIGHT_SCALES = ("absmax", "absmax-half", "mse")
ASYMMETRIC_WEIGHT_SCALES = ("minmax", "mse")
ACT_CALIBRATIONS = ("minmax", "percentile", "mse")
SPEC_FILE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class QuantSpec:
    """The exact quantizer a deployment uses: a QCB may fire under this spec and no other.

    Attributes:
        weight_bits: bits of every quantized conv/linear weight (2..8), except the first and last layer when
            `first_layer_bits` / `last_layer_bits` say otherwise.
        act_bits: bits of the input of every quantized conv/linear (2..8); None leaves activations in float
            (weight-only, Qu-ANTI-zation's original setting).
        weight_per_channel: one scale (and zero point) per output channel, else one per layer.
        weight_symmetric: signed integers and no zero point; False: unsigned integers [0, 2^b - 1] with an
            integer zero point per scale.
        weight_narrow_range: symmetric only: integers in [-(2^(b-1) - 1), 2^(b-1) - 1] ([-7, 7] at 4 bits)
            when True, else [-2^(b-1), 2^(b-1) - 1]. Ignored for asymmetric weights.
        weight_scale: how the weight range is chosen. "absmax": scale = absmax / (2^(b-1) - 1);
            "absmax-half": scale = absmax / (2^(b-1) - 0.5) (PQBackdoor's 127.5); "minmax" (asymmetric):
            scale = (max - min(min, 0)) / (2^b - 1); "mse": the range minimising the weights' squared
            quantization error (Brevitas's grid search). absmax/minmax follow the weights at every forward;
            mse is searched once (see `quantize.refresh_weight_ranges`).
        act_symmetric: signed symmetric activations, else unsigned with a zero point.
        act_calibration: how activation ranges are set from calibration data: "minmax", "percentile" (the
            0.001 and 99.999 percentiles, Brevitas's default) or "mse".
        first_layer_bits, last_layer_bits: weight bits of the first and last quantized layer in execution
            order (None: `weight_bits`). When `first_layer_bits` is set, the first layer's input (the image)
            is also quantized at that width instead of `act_bits`: images are 8-bit data, and the LAC/EFRAP
            evaluation does not quantize the network input at all.
        fold_bn: fold every BN into its preceding conv before quantizing (a deployment copy that no longer
            shares weights with the float model).
        quantize_adds: also quantize both inputs and the output (after its activation, e.g. a block's last
            ReLU) of every residual add and concat, each tensor once (a layer reading such a tensor takes
            it as is); what an integer runtime needs to keep the whole graph in 8 bits. Needs `act_bits`
            and a torch.fx-traceable model.
        name: the preset's name, "custom" otherwise. Carried by to_dict/from_dict but not compared: two
            specs describing the same quantizer are equal whatever their names. `replace` resets it.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_per_channel: bool = True
    weight_symmetric: bool = False
    weight_narrow_range: bool = True
    weight_scale: str = "mse"
    act_symmetric: bool = False
    act_calibration: str = "percentile"
    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    fold_bn: bool = False
    quantize_adds: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, optional=False)
        for key in ("act_bits", "first_layer_bits", "last_layer_bits"):
            _check_bits(key, getattr(self, key), optional=True)
        for key in ("weight_per_channel", "weight_symmetric", "weight_narrow_range", "act_symmetric",
                    "fold_bn", "quantize_adds"):
            if not isinstance(getattr(self, key), bool):
                raise InputError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.weight_scale not in WEIGHT_SCALES:
            raise InputError(f"weight_scale must be one of {', '.join(WEIGHT_SCALES)}, "
                             f"got {self.weight_scale!r}")
        allowed = SYMMETRIC_WEIGHT_SCALES if self.weight_symmetric else ASYMMETRIC_WEIGHT_SCALES
        if self.weight_scale not in allowed:
            kind = "symmetric" if self.weight_symmetric else "asymmetric"
            raise InputError(f"weight_scale {self.weight_scale!r} does not apply to {kind} weights; "
                             f"{kind} weights take one of {', '.join(allowed)}")
        if self.act_calibration not in ACT_CALIBRATIONS:
            raise InputError(f"act_calibration must be one of {', '.join(ACT_CALIBRATIONS)}, "
                             f"got {self.act_calibration!r}")
        if self.quantize_adds and self.act_bits is None:
            raise InputError("quantize_adds quantizes activations: it needs act_bits")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"name must be a non-empty string, got {self.name!r}")

    # ---- derived views -------------------------------------------------------------------------------

    @property
    def first_bits(self) -> int:
        """Weight bits of the first quantized layer."""
        return self.weight_bits if self.first_layer_bits is None else self.first_layer_bits

    @property
    def last_bits(self) -> int:
        """Weight bits of the last quantized layer."""
        return self.weight_bits if self.last_layer_bits is None else self.last_layer_bits

    @property
    def label(self) -> str:
        """A short human label, e.g. 'W4A4 per-channel asym mse, act asym percentile, first/last W8/W8'."""
        acts = "f" if self.act_bits is None else str(self.act_bits)
        weights = [f"W{self.weight_bits}A{acts}",
                   "per-channel" if self.weight_per_channel else "per-tensor",
                   ("sym" + (" narrow" if self.weight_narrow_range else " full")) if self.weight_symmetric
                   else "asym",
                   self.weight_scale]
        parts = [" ".join(weights)]
        if self.act_bits is not None:
            parts.append(f"act {'sym' if self.act_symmetric else 'asym'} {self.act_calibration}")
        if (self.first_bits, self.last_bits) != (self.weight_bits, self.weight_bits):
            parts.append(f"first/last W{self.first_bits}/W{self.last_bits}")
        if self.fold_bn:
            parts.append("BN folded")
        if self.quantize_adds:
            parts.append("adds quantized")
        return ", ".join(parts)

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with `changes` applied (validated); the name becomes "custom" unless given."""
        unknown = sorted(set(changes) - _field_names())
        if unknown:
            raise InputError(f"unknown QuantSpec field(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_field_names()))}")
        changes.setdefault("name", "custom")
        return dataclasses.replace(self, **changes)

    # ---- saving and loading --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data: {"version": 1, <every field>}."""
        return {"version": SPEC_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Inverse of `to_dict`. Missing fields take their defaults; unknown keys and a `version` other
        than this code's raise InputError."""
        if not isinstance(data, Mapping):
            raise InputError(f"a quant spec must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise InputError(f"quant spec version {version!r} is not supported; this code reads "
                             f"version {SPEC_VERSION}")
        unknown = sorted(str(k) for k in set(data) - _field_names())
        if unknown:
            raise InputError(f"unknown quant spec key(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_field_names()))}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"quant spec is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> QuantSpec:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"quant spec is not valid YAML: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec as JSON or YAML (by suffix), atomically."""
        path = Path(path)
        if path.suffix.lower() not in SPEC_FILE_SUFFIXES:
            raise InputError(f"spec file {str(path)!r} must end in {', '.join(SPEC_FILE_SUFFIXES)}")
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_yaml()
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantSpec:
        path = Path(path)
        if path.suffix.lower() not in SPEC_FILE_SUFFIXES:
            raise InputError(f"spec file {str(path)!r} must end in {', '.join(SPEC_FILE_SUFFIXES)}")
        if not path.is_file():
            raise InputError(f"spec file {str(path)!r} does not exist")
        text = path.read_text()
        return cls.from_json(text) if path.suffix.lower() == ".json" else cls.from_yaml(text)


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(QuantSpec)}


def _check_bits(key: str, bits: Any, *, optional: bool) -> None:
    if bits is None and optional:
        return
    check_number(key, bits, integer=True, low=MIN_BITS, high=MAX_BITS)


SPECS: Registry[QuantSpec] = Registry("quant spec")


def _preset(name: str, **fields: Any) -> None:
    SPECS.register(name)(QuantSpec(name=name, **fields))


# LAC / EFRAP evaluation quantizer: the QuantSpec defaults.
_preset("w8a8", weight_bits=8, act_bits=8)
_preset("w4a4", weight_bits=4, act_bits=4)
_preset("w4a8", weight_bits=4, act_bits=8)
_preset("w8a8-per-tensor", weight_bits=8, act_bits=8, weight_per_channel=False)
for _bits in (8, 4):
    _preset(f"quanti-w{_bits}a{_bits}", weight_bits=_bits, act_bits=_bits, weight_per_channel=False,
            weight_symmetric=True, weight_narrow_range=True, weight_scale="absmax",
            act_symmetric=False, act_calibration="minmax", first_layer_bits=None, last_layer_bits=None)
    _preset(f"pqbackdoor-w{_bits}a{_bits}", weight_bits=_bits, act_bits=_bits, weight_per_channel=True,
            weight_symmetric=True, weight_narrow_range=False, weight_scale="absmax-half",
            act_symmetric=False, act_calibration="minmax", first_layer_bits=None, last_layer_bits=None)

SPECS.register("pqbackdoor-w8a8-per-tensor")(SPECS.get("pqbackdoor-w8a8").replace(
    name="pqbackdoor-w8a8-per-tensor", weight_per_channel=False))
_preset("ort-w8a8", weight_bits=8, act_bits=8, weight_per_channel=True, weight_symmetric=True,
        weight_narrow_range=True, weight_scale="absmax", act_symmetric=False, act_calibration="minmax",
        first_layer_bits=None, last_layer_bits=None)


# Deployment: 7 bits where the other presets have 8 (onnxruntime's reduce_range, see the module docstring).
_DEPLOY = dict(act_bits=8, weight_per_channel=True, weight_symmetric=True, weight_narrow_range=True,
               weight_scale="mse", act_symmetric=False, act_calibration="percentile", quantize_adds=True)
_preset("w8a8-deploy", weight_bits=7, first_layer_bits=None, last_layer_bits=None, **_DEPLOY)
_preset("w4a8-deploy", weight_bits=4, first_layer_bits=7, last_layer_bits=7, **_DEPLOY)


def get_spec(spec: str | os.PathLike | QuantSpec) -> QuantSpec:
    """Normalise a spec argument: a QuantSpec, a preset name, or a path to a .json/.yaml spec file."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str) and spec in SPECS:
        return SPECS.get(spec)
    if isinstance(spec, (str, os.PathLike)) and Path(spec).suffix.lower() in SPEC_FILE_SUFFIXES:
        return QuantSpec.load(spec)
    if isinstance(spec, (str, os.PathLike)):
        raise InputError(f"unknown quant spec {str(spec)!r}; choose a preset from: {', '.join(SPECS.names())}"
                         f", or give a path to a {'/'.join(SPEC_FILE_SUFFIXES)} spec file")
    raise InputError(f"a quant spec must be a preset name, a spec file path or a QuantSpec, "
                     f"got {type(spec).__name__}")
