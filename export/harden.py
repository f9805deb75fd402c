"""Purify, export, verify in one call: the FP model in, a checked ONNX file out.

`harden` composes the verbs:
    1. `qcbdefense.defenses.purify`: quantize the FP model under `spec` and purify it with `method`;
    2. `save_purified` into OUT's sibling folder `<stem>.purified/` (weights, spec, purify report);
    3. `export.onnx.export_onnx` to OUT, with the defence and the FP checkpoint's sha256 in the metadata;
    4. `export.verify.verify` on OUT in onnxruntime, against the purified fake-quant model as reference
       (the file must be the model that was purified) and the thresholds (ASR, ASR gain over the FP model's
       ASR, agreement, CA).
Before the export, a model whose file will hold int32 biases has its biases (BN's, where BN folds) moved onto
that grid (`export.onnx.snap_biases_to_int32`, at most half an accumulator step each), so that the reference is
the model the file computes: on a ResNet-20 at w8a8-deploy that took the file's agreement from 99.20 to 99.76 %;
the purify report's figures are the model's before that move, the verify report's the file's.
With 8-bit activations `harden` first equalizes the activations where that helps (`quant.equalize`: channels whose
range dwarfs the rest of their tensor scaled down where written and up where read, the float function unchanged; kept
when the model so quantized agrees with the FP model on more calibration images), then widens every activation range
but the image's 3x before the defence (`act_headroom`, `quant.calibrate.widen_ranges`): a QCB aimed at the deployment
quantizer can live in the clip of the clean-calibrated ranges, where reconstructing weights cannot reach it. At 8 bits
the wider grid cost a clean ResNet-20 0.35 points of CA, and an attacked one 3.8, whose attack had grown a few
channels far past the rest of their tensors: 0.9 once equalized (BENCHMARKS.md, deployment int8). Below 8 bits a wider
grid costs too much; there it stays 1.
Its one decision of its own: when the int8 file fails the gate on agreement alone, its int32 biases and folded
BN moved the model (a fragile MobileNetV3 agrees on 94 %, resnet18 on 97 %): `harden` then exports it again with
BN kept and float biases and ships that file when it passes, saying so (`HardenReport.bn`), since a slower file
that is the purified model is worth more than a fast one that is not. `keep_bn=True` / `False` decides it up front.

Thresholds are checked before the purification starts, so a nonsense gate fails in a second, not after
minutes of reconstruction. The report also applies the gate's ASR and CA thresholds to the round-to-nearest
model (`before`), so it shows what purification changed: an attacked model fails there and passes after.

Examples:
    >>> report = harden(model, data, out="model.onnx", arch="resnet20", spec="w8a8",
    ...                 trigger=parse_trigger("patch"), max_asr=5.0, min_agreement=99.0)  # doctest: +SKIP
    >>> print(report.summary())                                                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.onnx import META, export_onnx, keep_bn_rewrites, snap_biases_to_int32
from export.ort import Check, VerifyReport
from export.verify import check_limits, gate, verify
from qcbdefense.data import Dataset, load_dataset
from qcbdefense.defenses import PurifyReport, purify, save_purified
from qcbdefense.defenses.base import PURIFY_CALIB
from qcbdefense.errors import InputError
from qcbdefense.quant.equalize import traceable
from qcbdefense.quant.spec import QuantSpec, get_spec
from qcbdefense.report import Report
from qcbdefense.runinfo import environment
from qcbdefense.triggers import Trigger, parse_trigger

DEPLOY_HEADROOM = 3.0  # with 8-bit activations: the small_cnn QCB of BENCHMARKS.md's deployment section needs 3x
# With 8-bit activations, the calibration images (cut to the training images there are): with purify's 1,024 the
# ResNet-20 QCB aimed at w8a8-deploy kept 36.3 % ASR, 2.4 points over its FP model's, with 2,048 32.8-33.0 % over two
# seeds, under its FP model's 33.9 %; the QCB aimed at LAC's w8a8 kept 32.8-34.0 % against 34.9 % (BENCHMARKS.md,
# deployment int8)
DEPLOY_CALIB = 2048


@dataclass(frozen=True)
class HardenReport(Report):
    """The three steps' reports and where their outputs are."""

    VERSION = 4  # 4 / 3: the purify report inside is version 4 (equalized) / 3 (act_headroom)
    KIND = "harden report"

    onnx: str
    purified_dir: str
    purify: PurifyReport
    verify: VerifyReport
    seconds: dict
    before: list[Check] = field(default_factory=list)  # the gate on the round-to-nearest fake-quant model
    # {"shipped": "folded" | "kept", "biases_on_int32_grid": biases moved by `snap_biases_to_int32`,
    # "folded_agreement": % when it fell back, "kept_agreement": % when the BN-kept file was tried and failed too}
    bn: dict = field(default_factory=dict)
    environment: dict = field(default_factory=environment)

    @property
    def passed(self) -> bool:
        return self.verify.passed

    def summary(self) -> str:
        seconds = self.seconds
        return "\n".join([
            "== purify ==", self.purify.summary(),
            "== verify (onnxruntime, the shipped file) ==", self.verify.summary(),
            *([] if not self.before else [
                "the same gate before purification (round-to-nearest, fake-quant): "
                + ("passed" if all(c.passed for c in self.before) else
                   "FAILED (" + ", ".join(f"{c.name} {c.value:.2f}" for c in self.before if not c.passed) + ")")]),
            *([] if "folded_agreement" not in self.bn else [
                f"BN kept and float biases: the folded int8 file agreed with the purified model on only "
                f"{self.bn['folded_agreement']:.2f} % (int32 biases move this model); onnxruntime runs those convs "
                f"in float"]),
            *([] if "kept_agreement" not in self.bn else [
                f"BN kept and float biases were tried too and failed the gate (agreement "
                f"{self.bn['kept_agreement']:.2f} %): the folded file is shipped"]),
            f"files: {self.onnx}  (purified model: {self.purified_dir})",
            f"time: purify {seconds['purify']:.1f} s, export {seconds['export']:.1f} s, verify "
            f"{seconds['verify']:.1f} s, total {seconds['total']:.1f} s",
        ])


def harden(model: nn.Module, data: Dataset | str, *, out: str | os.PathLike, arch: str = "model",
           spec: str | QuantSpec = "w8a8", method: str = "lac-pda", trigger: Trigger | str | None = None,
           target: int = 0, calib: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
           source_sha256: str | None = None, max_asr: float | None = None, min_agreement: float | None = 99.0,
           min_ca: float | None = None, max_asr_gain: float | None = None, threads: int | None = None,
           keep_bn: bool | None = None, equalize: str | None = None, act_headroom: float | None = None,
           progress: bool = False,
           **options: Any) -> HardenReport:
    """Purify `model` under `spec` with `method`, export the purified model to `out` (.onnx), verify the file.

    Args:
        model: the FP model (never modified). `arch`: its architecture name, for the reports.
        trigger, target: scored by purify and gated by verify (`max_asr`); the defence never sees them.
        calib: clean training images the defence calibrates on; None: `DEPLOY_CALIB` with 8-bit activations,
            else purify's (`PURIFY_CALIB`), cut to the training images there are.
        max_asr, min_agreement, min_ca: the gate (percentages, None: not checked); agreement is with the
            purified fake-quant model, so the default 99 checks that the file is the purified model.
        max_asr_gain: the most the file's ASR may exceed the FP model's own ASR (percentage points).
        keep_bn: True: export with BN kept and float biases (`export_onnx`'s two rewrites off): the file computes
            what the purified model computes, but onnxruntime cannot run those convs on integer kernels. False:
            fold them (8-bit activations) whatever the agreement. None: fold, and keep them when the folded file
            fails on agreement alone and the kept one passes (module docstring).
        equalize: `purify`'s; None: "auto" with 8-bit activations when torch.fx can trace the model, else "off"
            (module docstring).
        act_headroom: `purify`'s; None: 3 with 8-bit activations, else 1 (module docstring).
        **options: the method's options (e.g. steps=2000), as for `purify`.
    """
    start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"ONNX output {out} must end in .onnx")
    if isinstance(trigger, str):
        trigger = parse_trigger(trigger)
    check_limits(trigger=trigger, has_reference=True, max_asr=max_asr, min_agreement=min_agreement,
                 min_ca=min_ca, max_asr_gain=max_asr_gain, has_baseline=True)
    if isinstance(data, str):
        data = load_dataset(data)
    spec = get_spec(spec)
    if act_headroom is None:
        act_headroom = DEPLOY_HEADROOM if spec.act_bits == 8 else 1.0
    if equalize is None:
        equalize = "auto" if spec.act_bits == 8 and traceable(model) else "off"
    if calib is None:
        calib = min(DEPLOY_CALIB if spec.act_bits == 8 else PURIFY_CALIB, len(data.train_y))
    purified, purify_report = purify(model, data, method=method, spec=spec, calib=calib, trigger=trigger,
                                     target=target, seed=seed, device=device, arch=arch, progress=progress,
                                     equalize=equalize, act_headroom=act_headroom, **options)
    snapped = 0
    if keep_bn is not True and purified.qcb_spec.act_bits == 8:  # the file will hold int32 biases
        snapped = snap_biases_to_int32(purified, input_size=tuple(data.test_x.shape[2:]))
    purified_at = time.perf_counter()
    purified_dir = out.with_name(out.stem + ".purified")
    save_purified(purified, purified_dir, report=purify_report)
    fp_asr = purify_report.fp.asr if purify_report.fp is not None else None
    seconds = {"purify": purified_at - start, "export": 0.0, "verify": 0.0}

    def export_and_verify(path: Path, keep: bool) -> VerifyReport:
        began = time.perf_counter()
        export_onnx(purified, path, spec=purify_report.spec, defense=method, source_sha256=source_sha256,
                    input_size=tuple(data.test_x.shape[2:]),  # the file takes the data's own image size
                    **keep_bn_rewrites(keep))
        exported = time.perf_counter()
        report = verify(path, data, trigger=trigger, target=target, reference=purified.cpu(), max_asr=max_asr,
                        min_agreement=min_agreement, min_ca=min_ca, max_asr_gain=max_asr_gain,
                        baseline_asr=fp_asr, threads=threads)
        seconds["export"] += exported - began
        seconds["verify"] += time.perf_counter() - exported
        return report

    verify_report = export_and_verify(out, bool(keep_bn))
    # what the file holds (below 8 bits: kept), and how many of the model's biases were put on its int32 grid
    bn = {"shipped": "folded" if _folds(verify_report) else "kept", "biases_on_int32_grid": snapped}
    if keep_bn is None and _fails_on_agreement_alone(verify_report) and bn["shipped"] == "folded":
        kept_path = out.with_name(out.stem + ".bn-kept.onnx")
        kept = export_and_verify(kept_path, True)
        if kept.passed:
            os.replace(kept_path, out)
            bn = {**bn, "shipped": "kept", "folded_agreement": verify_report.score.agreement}
            verify_report = dataclasses.replace(kept, model=str(out))
        else:
            kept_path.unlink()
            bn["kept_agreement"] = kept.score.agreement
    nearest = purify_report.nearest
    before = [] if nearest is None else gate(ca=nearest.ca, asr=nearest.asr, agreement=None, baseline_asr=fp_asr,
                                             max_asr=max_asr, max_asr_gain=max_asr_gain, min_ca=min_ca)
    seconds["total"] = time.perf_counter() - start
    return HardenReport(onnx=str(out), purified_dir=str(purified_dir), purify=purify_report,
                        verify=verify_report, before=before, bn=bn, seconds=seconds)


def _fails_on_agreement_alone(report: VerifyReport) -> bool:
    return bool(report.failed) and all(check.name == "agreement %" for check in report.failed)


def _folds(report: VerifyReport) -> bool:
    """Whether `export_onnx` folded BN or rounded biases into this file (only at 8-bit activations)."""
    return any(int(report.metadata.get(META + key, 0)) > 0 for key in ("bn_folded_into_scales", "int32_biases"))
