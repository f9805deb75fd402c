"""qcbdefense: purify and detect quantization-conditioned backdoors.

The verbs a user calls are importable from here (`from qcbdefense import purify`; README, "Python API"). Each
loads its module on first use, so importing the package, and `qcbdefense --help`, costs no more than torch:
Brevitas and onnxruntime take seconds to import and most commands need neither.

The toolkit installs three top-level packages side by side: qcbdefense, models and export. A user's own
folder named models/ or export/ must not stand in for the last two (`python -m qcbdefense` puts the current
folder first on sys.path), so importing qcbdefense makes Python look those two names up beside this package
first, and refuses with one clear message when a foreign package of that name was imported before.
"""

import importlib
import sys
from importlib.machinery import PathFinder
from pathlib import Path

__version__ = "0.1.0"

_ROOT = Path(__file__).resolve().parent.parent
_SIBLINGS = ("models", "export")


class _SiblingFinder:
    """A meta path finder that resolves `models` and `export` in this installation, ahead of sys.path."""

    root = _ROOT

    @staticmethod
    def find_spec(name, path=None, target=None):
        return PathFinder.find_spec(name, [str(_ROOT)]) if name in _SIBLINGS else None


def _claim_siblings() -> None:
    for name in _SIBLINGS:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if module is not None and (origin is None or Path(origin).resolve().parent.parent != _ROOT):
            where = origin or ", ".join(getattr(module, "__path__", [])) or "unknown"
            raise ImportError(f"qcbdefense needs its own top-level package '{name}' ({_ROOT / name}), but a "
                              f"'{name}' from {where} is already imported: import qcbdefense before it, or rename "
                              f"your package")
    if not any(getattr(finder, "root", None) == _ROOT for finder in sys.meta_path):
        sys.meta_path.insert(0, _SiblingFinder())


_claim_siblings()


# Public name -> (module, attribute). No submodule of this package is named after a verb: importing a submodule
# binds its name here, which would shadow the function (tests/qcbdefense/test_public_api.py checks).
_API = {
    # data, triggers and models
    "load_dataset": ("qcbdefense.data", "load_dataset"),
    "parse_trigger": ("qcbdefense.triggers", "parse_trigger"),
    "create_model": ("models", "create_model"),
    "build_model": ("models.reference", "build_model"),
    "list_models": ("models", "list_models"),
    "load_model": ("qcbdefense.checkpoints", "load_model"),
    "save_model": ("qcbdefense.checkpoints", "save_model"),
    # training and scoring
    "TrainConfig": ("qcbdefense.training", "TrainConfig"),
    "train": ("qcbdefense.clean_training", "train"),
    "evaluate": ("qcbdefense.scoring", "evaluate"),
    "Score": ("qcbdefense.scoring", "Score"),
    "agreement": ("qcbdefense.scoring", "agreement"),
    "defense_effectiveness_rating": ("qcbdefense.scoring", "defense_effectiveness_rating"),
    # quantization
    "QuantSpec": ("qcbdefense.quant.spec", "QuantSpec"),
    "get_spec": ("qcbdefense.quant.spec", "get_spec"),
    "quantize": ("qcbdefense.quant.quantize", "quantize"),
    "calibrate": ("qcbdefense.quant.calibrate", "calibrate"),
    "float_view": ("qcbdefense.quant.calibrate", "float_view"),
    "post_training_quantize": ("qcbdefense.quant.ptq", "post_training_quantize"),
    "compare_specs": ("qcbdefense.quant.ptq", "compare_specs"),
    "integer_weights": ("qcbdefense.quant.inspect", "integer_weights"),
    # attacks, defences, scanner
    "attack": ("qcbdefense.attacks", "attack"),
    "purify": ("qcbdefense.defenses", "purify"),
    "save_purified": ("qcbdefense.defenses", "save_purified"),
    "load_purified": ("qcbdefense.defenses", "load_purified"),
    "scan": ("qcbdefense.scanner.scan", "scan"),
    "ScanConfig": ("qcbdefense.scanner.scan", "ScanConfig"),
    # deployment: ONNX export and onnxruntime checks (the export package, loaded only when asked for)
    "export_onnx": ("export.onnx", "export_onnx"),
    "export_float_onnx": ("export.onnx", "export_float_onnx"),
    "evaluate_onnx": ("export.ort", "evaluate_onnx"),
    "verify": ("export.verify", "verify"),
    "harden": ("export.harden", "harden"),
    # the README's jobs
    "run_demo": ("qcbdefense.demo", "run_demo"),
    "BenchConfig": ("qcbdefense.bench", "BenchConfig"),
    "run_bench": ("qcbdefense.bench", "run_bench"),
    # errors
    "QcbError": ("qcbdefense.errors", "QcbError"),
    "InputError": ("qcbdefense.errors", "InputError"),
    "RunFailed": ("qcbdefense.errors", "RunFailed"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
