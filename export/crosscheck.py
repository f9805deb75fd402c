"""An independent cross-check: quantize the FP model with onnxruntime's own quantizer and measure CA / ASR.

A quantization-conditioned backdoor is planted against one quantizer (METHOD.md §2: PQBackdoor is exact for
the grid it targets and may not transfer). Our Brevitas quantizer is the deployment the purifier
protects; ORT's `quantize_static` is another quantizer a user could pick instead, written by other people.
Quantizing the exported FP ONNX with it answers "does the backdoor fire under ORT's quantizer too?", and,
for a purified model, reminds that the purification protects the spec it was run for, not every quantizer.

What ORT quantizes (`quantize_static`, QDQ format, calibrated on clean training images through a
`CalibrationDataReader`, min/max ranges; the graph is first put through `quant_pre_process`, which fuses
BN into the convs):
    ort-int8    per-channel symmetric QInt8 weights, QUInt8 activations, every Conv / Gemm / Add / pool
    ort-int4w   per-channel QInt4 weights, QUInt8 activations (ORT writes int4 weights as com.microsoft
                Q/DQ at opset < 21; they run in onnxruntime on float kernels)
Unlike our spec, ORT also quantizes the residual adds and quantizes the network input at 8 bits.

Examples:
    >>> rows = crosscheck("fp.onnx", data, trigger=parse_trigger("patch"), target=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from export.onnx import META, export_float_onnx, read_metadata
from export.ort import OrtModel
from qcbdefense.data import Dataset
from qcbdefense.errors import InputError, check_number
from qcbdefense.quant.ptq import calibration_images
from qcbdefense.results import format_table
from qcbdefense.scoring import agreement
from qcbdefense.triggers import Trigger, non_target

CALIB_BATCH = 64


@dataclass(frozen=True)
class OrtQuantizer:
    """One configuration of `onnxruntime.quantization.quantize_static` (QuantType and QuantFormat names)."""

    name: str
    weight_type: str
    activation_type: str
    per_channel: bool = True
    quant_format: str = "QDQ"
    reduce_range: bool = False


ORT_QUANTIZERS = (OrtQuantizer("ort-int8", "QInt8", "QUInt8"), OrtQuantizer("ort-int4w", "QInt4", "QUInt8"))


@dataclass
class CrosscheckRow:
    """CA / ASR (%) of one model of the cross-check; `agreement` is with the FP ONNX on clean images."""

    name: str
    weight_type: str | None
    activation_type: str | None
    ca: float
    asr: float | None
    agreement: float
    quantize_seconds: float
    eval_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def crosscheck(fp_model: nn.Module | str | os.PathLike, data: Dataset, *, trigger: Trigger | None = None,
               target: int = 0, calib: int = 512, seed: int = 0, threads: int | None = None,
               quantizers: tuple[OrtQuantizer, ...] = ORT_QUANTIZERS,
               keep_dir: str | os.PathLike | None = None) -> list[CrosscheckRow]:
    """Quantize the FP model with onnxruntime's `quantize_static` under each of `quantizers`; score each.

    Args:
        fp_model: the FP model as a PyTorch module (exported here with `export_float_onnx`) or a float ONNX
            file (a quantized file is refused: quantizing it again would measure nothing).
        calib: clean training images for ORT's calibration (a seeded subset, as for our own PTQ).
        keep_dir: write the FP and ORT-quantized ONNX files there (default: a temporary folder, deleted).

    Returns:
        Rows "fp" (the FP ONNX), then one per quantizer, each with CA, ASR and agreement with the FP ONNX.
    """
    check_number("calib", calib, integer=True, low=1, kind="a number of images")
    with tempfile.TemporaryDirectory(prefix="qcb-crosscheck-") as scratch:
        folder = Path(keep_dir) if keep_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        fp_path = float_onnx_path(fp_model, folder)
        prepared = prepare_for_ort(fp_path, folder / "fp-preprocessed.onnx")
        fp = OrtModel(fp_path, threads=threads)
        fp.check_images(data.test_x.shape[1:], what=f"the data {data.name!r}")
        images = calibration_images(data, calib, seed=seed)
        rows = []
        start = time.perf_counter()
        fp_preds = fp.predict(data.test_x)
        rows.append(_score("fp", None, None, fp, fp_preds, fp_preds, data, trigger, target, 0.0, start))
        for quantizer in quantizers:
            out = folder / f"{quantizer.name}.onnx"
            start = time.perf_counter()
            ort_quantize(prepared, out, images, quantizer, quant_format=quantizer.quant_format,
                         reduce_range=quantizer.reduce_range, preprocessed=True)
            quantized = time.perf_counter()
            model = OrtModel(out, threads=threads)
            rows.append(_score(quantizer.name, quantizer.weight_type, quantizer.activation_type, model,
                               model.predict(data.test_x), fp_preds, data, trigger, target,
                               quantized - start, quantized))
        return rows


def prepare_for_ort(fp_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """ORT's pre-processing of an FP ONNX file before `quantize_static` (shape inference, BN fused into convs)."""
    quant_pre_process(str(fp_path), str(out), skip_symbolic_shape=True)
    return Path(out)


def ort_quantize(fp_onnx: str | os.PathLike, out: str | os.PathLike, images: torch.Tensor,
                 quantizer: OrtQuantizer, *, quant_format: str = "QDQ", reduce_range: bool = False,
                 preprocessed: bool = False) -> Path:
    """Quantize a float ONNX file with onnxruntime's `quantize_static` (QDQ or QOperator), calibrated on uint8
    `images`; `preprocessed`: `quant_pre_process` already ran (else it runs here, into a file beside `out`)."""
    out = Path(out)
    source = Path(fp_onnx)
    if not preprocessed:
        source = prepare_for_ort(fp_onnx, out.with_name(out.stem + "-preprocessed.onnx"))
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    quantize_static(str(source), str(out), _CleanImages(images, input_name), quant_format=QuantFormat[quant_format],
                    per_channel=quantizer.per_channel, reduce_range=reduce_range,
                    weight_type=QuantType[quantizer.weight_type], activation_type=QuantType[quantizer.activation_type])
    return out


def crosscheck_table(rows: list[CrosscheckRow]) -> str:
    return format_table(["model", "weights", "acts", "CA %", "ASR %", "agree w/ FP %"],
                        [[r.name, r.weight_type or "float", r.activation_type or "float", r.ca, r.asr, r.agreement]
                         for r in rows])


def float_onnx_path(fp_model: nn.Module | str | os.PathLike, folder: Path) -> Path:
    """The FP model as a float ONNX file (a module is exported into `folder`); InputError for a quantized file."""
    if isinstance(fp_model, nn.Module):
        return export_float_onnx(fp_model, folder / "fp.onnx")
    path = Path(fp_model)
    kind = read_metadata(path).get(META + "kind")
    proto = onnx.load(str(path), load_external_data=False)
    if kind == "quantized" or any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        raise InputError(f"onnxruntime's quantizer needs the FP model, but {path} is already quantized; give the FP "
                         f"checkpoint (with --model) or its float ONNX")
    return path


def _score(name, weight_type, activation_type, model: OrtModel, preds: torch.Tensor, fp_preds: torch.Tensor,
           data: Dataset, trigger: Trigger | None, target: int, quantize_seconds: float,
           start: float) -> CrosscheckRow:
    asr = None
    if trigger is not None:
        xp, _ = non_target(data.test_x, data.test_y, target)
        poisoned = model.predict(xp, transform=trigger.apply)
        asr = 100.0 * (poisoned == target).float().mean().item() if len(xp) else 0.0
    ca = 100.0 * (preds == data.test_y).float().mean().item()
    return CrosscheckRow(name, weight_type, activation_type, ca, asr, agreement(preds, fp_preds),
                         quantize_seconds, time.perf_counter() - start)


class _CleanImages(CalibrationDataReader):
    """Clean uint8 images as ORT's calibration feed: `get_next` gives {input name: float batch}, then None."""

    def __init__(self, images: torch.Tensor, input_name: str) -> None:
        super().__init__()
        self.images, self.input_name, self.start = images, input_name, 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + CALIB_BATCH]
        self.start += CALIB_BATCH
        return {self.input_name: batch.to(torch.float32).div(255.0).numpy()}

    def rewind(self) -> None:
        self.start = 0
