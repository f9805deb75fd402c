"""The deployment gate: run the ONNX file that ships in onnxruntime and check it against thresholds.

`verify` = `export.ort.evaluate_onnx` + pass/fail per threshold (+ optionally the ORT-quantizer cross-check
of `export.crosscheck`, reported, never gated: it measures another quantizer than the one that ships).
A threshold is checked only when given, and one that cannot be measured is refused, not skipped:
`max_asr` needs a trigger, `min_agreement` a reference.

Examples:
    >>> report = verify("model.onnx", data, trigger=parse_trigger("patch"), target=0, reference=qmodel,
    ...                 max_asr=5.0, min_agreement=99.0)                               # doctest: +SKIP
    >>> report.passed                                                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import os

from torch import nn

from export.ort import DEFAULT_BATCH, Check, OrtModel, VerifyReport, evaluate_onnx
from qcbdefense.data import Dataset
from qcbdefense.errors import InputError
from qcbdefense.triggers import Trigger


def check_limits(*, trigger: Trigger | None, has_reference: bool, max_asr: float | None,
                 min_agreement: float | None, min_ca: float | None) -> None:
    """InputError for a threshold that is not a percentage or cannot be measured with what was given."""
    limits = {"max_asr": max_asr, "min_agreement": min_agreement, "min_ca": min_ca}
    for key, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0.0 <= value <= 100.0):
            raise InputError(f"{key} must be a percentage in [0, 100], got {value!r}")
    if max_asr is not None and trigger is None:
        raise InputError("max_asr needs a trigger to measure the attack success rate; give one (e.g. 'patch')")
    if min_agreement is not None and not has_reference:
        raise InputError("min_agreement needs a reference model (a checkpoint with its architecture, or an ONNX "
                         "file) to agree with")


def verify(onnx_path: str | os.PathLike, data: Dataset, *, trigger: Trigger | None = None, target: int = 0,
           reference: nn.Module | str | os.PathLike | OrtModel | None = None, max_asr: float | None = None,
           min_agreement: float | None = None, min_ca: float | None = None,
           crosscheck_model: nn.Module | str | os.PathLike | None = None, calib: int = 512, seed: int = 0,
           threads: int | None = None, batch_size: int = DEFAULT_BATCH) -> VerifyReport:
    """Evaluate the ONNX model in onnxruntime and check it: ASR <= max_asr, agreement with `reference` >=
    min_agreement, CA >= min_ca (percentages; None: not checked). `report.passed` is the verdict.

    Args:
        reference: what the file must agree with: the fake-quant PyTorch model it was exported from (the
            export is faithful), or the FP model / its ONNX (the deployment behaves like what was inspected).
        crosscheck_model: an FP model (module or float ONNX) to quantize with ORT's own quantizer and score
            beside (`export.crosscheck`); None: no cross-check. `calib`, `seed`: its calibration images.
    """
    check_limits(trigger=trigger, has_reference=reference is not None, max_asr=max_asr,
                 min_agreement=min_agreement, min_ca=min_ca)
    report = evaluate_onnx(onnx_path, data, trigger=trigger, target=target, reference=reference, threads=threads,
                           batch_size=batch_size)
    if min_ca is not None:
        report.checks.append(Check.of("CA %", report.ca, float(min_ca), "min"))
    if max_asr is not None:
        report.checks.append(Check.of("ASR %", report.asr, float(max_asr), "max"))
    if min_agreement is not None:
        report.checks.append(Check.of("agreement %", report.agreement, float(min_agreement), "min"))
    if crosscheck_model is not None:
        from export.crosscheck import crosscheck

        rows = crosscheck(crosscheck_model, data, trigger=trigger, target=target, calib=calib, seed=seed,
                          threads=threads)
        report.crosscheck = [row.to_dict() for row in rows]
    return report
