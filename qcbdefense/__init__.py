"""qcbdefense: purify and detect quantization-conditioned backdoors.

The verbs a user calls are importable from here (`from qcbdefense import purify`; README, "Python API"). Each
loads its module on first use, so importing the package, and `qcbdefense --help`, costs no more than torch:
Brevitas and onnxruntime take seconds to import and most commands need neither.
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute). Three verbs carry a longer name than their function because a submodule of
# this package already holds the short one (qcbdefense.train, .evaluate, .scan), and importing a submodule binds
# its name here to the module.
_API = {
    # data, triggers and models
    "load_dataset": ("qcbdefense.data", "load_dataset"),
    "parse_trigger": ("qcbdefense.triggers", "parse_trigger"),
    "create_model": ("models", "create_model"),
    "list_models": ("models", "list_models"),
    "load_model": ("qcbdefense.checkpoints", "load_model"),
    "save_model": ("qcbdefense.checkpoints", "save_model"),
    # training and scoring
    "TrainConfig": ("qcbdefense.training", "TrainConfig"),
    "train_model": ("qcbdefense.train", "train"),
    "evaluate_model": ("qcbdefense.evaluate", "evaluate"),
    "agreement": ("qcbdefense.evaluate", "agreement"),
    "defense_effectiveness_rating": ("qcbdefense.evaluate", "defense_effectiveness_rating"),
    # quantization
    "QuantSpec": ("qcbdefense.quant.spec", "QuantSpec"),
    "get_spec": ("qcbdefense.quant.spec", "get_spec"),
    "quantize": ("qcbdefense.quant.quantize", "quantize"),
    "calibrate": ("qcbdefense.quant.calibrate", "calibrate"),
    "float_view": ("qcbdefense.quant.calibrate", "float_view"),
    "post_training_quantize": ("qcbdefense.quant.ptq", "post_training_quantize"),
    "integer_weights": ("qcbdefense.quant.inspect", "integer_weights"),
    # attacks, defences, scanner
    "attack": ("qcbdefense.attacks", "attack"),
    "purify": ("qcbdefense.defenses", "purify"),
    "save_purified": ("qcbdefense.defenses", "save_purified"),
    "load_purified": ("qcbdefense.defenses", "load_purified"),
    "scan_pair": ("qcbdefense.scan.scan", "scan"),
    "ScanConfig": ("qcbdefense.scan.scan", "ScanConfig"),
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
