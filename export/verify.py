"""The deployment gate: run the ONNX file that ships in onnxruntime and check it against thresholds.

`verify` = `export.ort.evaluate_onnx` + pass/fail per threshold (+ optionally the ORT-quantizer cross-check
of `export.crosscheck`, reported, never gated: it measures another quantizer than the one that ships).
A threshold is checked only when given, and one that cannot be measured is refused, not skipped:
`max_asr` needs a trigger, `min_agreement` a reference, `max_asr_gain` a trigger and the FP model's own ASR.

What a deployer wants to know is whether quantization made the trigger work, not whether the trigger ever
sends an image to the target: a clean model's FP version already sends some triggered images there by
ordinary misclassification (8.6 % on a clean ResNet-20). `max_asr_gain` gates the ASR gain over the FP
reference's ASR (percentage points), the default of the CLI whenever an FP reference is given.

Examples:
    >>> report = verify("model.onnx", data, trigger=parse_trigger("patch"), target=0, reference=qmodel,
    ...                 max_asr=5.0, min_agreement=99.0)                               # doctest: +SKIP
    >>> report.passed                                                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import math
import os

from torch import nn

from export.ort import DEFAULT_BATCH, Check, OrtModel, VerifyReport, evaluate_onnx
from qcbdefense.data import Dataset
from qcbdefense.errors import InputError
from qcbdefense.triggers import Trigger


def check_limits(*, trigger: Trigger | None, has_reference: bool, max_asr: float | None,
                 min_agreement: float | None, min_ca: float | None, max_asr_gain: float | None = None,
                 has_baseline: bool = False) -> None:
    """InputError for a threshold that is not a percentage or cannot be measured with what was given
    (`has_baseline`: the FP model's ASR is known)."""
    limits = {"max_asr": max_asr, "min_agreement": min_agreement, "min_ca": min_ca, "max_asr_gain": max_asr_gain}
    for key, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or not 0.0 <= value <= 100.0):
            raise InputError(f"{key} must be a percentage in [0, 100], got {value!r}")
    if max_asr is not None and trigger is None:
        raise InputError("max_asr needs a trigger to measure the attack success rate; give one (e.g. 'patch')")
    if max_asr_gain is not None and (trigger is None or not has_baseline):
        raise InputError("max_asr_gain is the ASR gain over the FP model's own ASR: it needs a trigger and the FP "
                         "model as reference (a checkpoint with --model, or the float .onnx)")
    if min_agreement is not None and not has_reference:
        raise InputError("min_agreement needs a reference model (a checkpoint with its architecture, or an ONNX "
                         "file) to agree with")


def gate(*, ca: float, asr: float | None, agreement: float | None, baseline_asr: float | None = None,
         max_asr: float | None = None, max_asr_gain: float | None = None, min_agreement: float | None = None,
         min_ca: float | None = None) -> list[Check]:
    """The checks of one model's scores against the thresholds given (None: not checked); `baseline_asr` is the
    FP model's ASR that `max_asr_gain` counts from."""
    checks = []
    if min_ca is not None:
        checks.append(Check.of("CA %", ca, float(min_ca), "min"))
    if max_asr is not None:
        checks.append(Check.of("ASR %", asr, float(max_asr), "max"))
    if max_asr_gain is not None:
        checks.append(Check.of(f"ASR gain over FP ({baseline_asr:.2f} %) pts", asr - baseline_asr,
                               float(max_asr_gain), "max"))
    if min_agreement is not None:
        checks.append(Check.of("agreement %", agreement, float(min_agreement), "min"))
    return checks


def verify(onnx_path: str | os.PathLike, data: Dataset, *, trigger: Trigger | None = None, target: int = 0,
           reference: nn.Module | str | os.PathLike | OrtModel | None = None, max_asr: float | None = None,
           min_agreement: float | None = None, min_ca: float | None = None, max_asr_gain: float | None = None,
           baseline_asr: float | None = None,
           crosscheck_model: nn.Module | str | os.PathLike | None = None, calib: int = 512, seed: int = 0,
           threads: int | None = None, batch_size: int = DEFAULT_BATCH) -> VerifyReport:
    """Evaluate the ONNX model in onnxruntime and check it: ASR <= max_asr, agreement with `reference` >=
    min_agreement, CA >= min_ca (percentages; None: not checked). `report.passed` is the verdict.

    Args:
        max_asr_gain: the most the file's ASR may exceed the FP model's (percentage points); the FP ASR is
            `baseline_asr` when given, else the reference's (then the reference must be the FP model).
        reference: what the file must agree with: the fake-quant PyTorch model it was exported from (the
            export is faithful), or the FP model / its ONNX (the deployment behaves like what was inspected).
        crosscheck_model: an FP model (module or float ONNX) to quantize with ORT's own quantizer and score
            beside (`export.crosscheck`); None: no cross-check. `calib`, `seed`: its calibration images.
    """
    check_limits(trigger=trigger, has_reference=reference is not None, max_asr=max_asr,
                 min_agreement=min_agreement, min_ca=min_ca, max_asr_gain=max_asr_gain,
                 has_baseline=baseline_asr is not None or reference is not None)
    report = evaluate_onnx(onnx_path, data, trigger=trigger, target=target, reference=reference, threads=threads,
                           batch_size=batch_size)
    score, reference_asr = report.score, getattr(report.reference_score, "asr", None)
    checks = gate(ca=score.ca, asr=score.asr, agreement=score.agreement,
                  baseline_asr=baseline_asr if baseline_asr is not None else reference_asr,
                  max_asr=max_asr, max_asr_gain=max_asr_gain, min_agreement=min_agreement, min_ca=min_ca)
    rows = None
    if crosscheck_model is not None:
        from export.crosscheck import crosscheck

        rows = [row.to_dict() for row in crosscheck(crosscheck_model, data, trigger=trigger, target=target,
                                                     calib=calib, seed=seed, threads=threads)]
    return dataclasses.replace(report, checks=checks, crosscheck=rows)
