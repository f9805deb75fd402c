"""Which configurations of onnxruntime's `quantize_static` wake a QCB planted against a given quantizer.

A deployer who quantizes a stranger's FP model with onnxruntime picks ORT's grid, not the attacker's, and the
two differ in what decides whether the backdoor fires: `quant_pre_process` folds BN into the convs before
quantizing; symmetric int8 weights take abs-max / 127 on [-127, 127] (PQBackdoor's grid is / 127.5); uint8
activations are calibrated by min / max; every tensor is quantized (the input and the adds too). A per-channel
symmetric scale commutes with BN folding (BN multiplies a channel and its abs-max by the same factor), so an
attack aimed at ORT's per-channel grid (`ort-int8.yaml` beside its run) survives the folding; a per-tensor grid
does not, nor does `reduce_range` (7-bit weights).

Writes OUT/fp.onnx, one OUT/<configuration>.onnx each, and OUT/table.md (CA, ASR, agreement with the FP file).
Scan the pair that fires with `qcbdefense scan --fp OUT/fp.onnx --quantized OUT/<configuration>.onnx`.

Usage: python experiments/ort_firing.py CKPT MODEL DATA TRIGGER TARGET OUT
"""

import sys
from pathlib import Path

from export.crosscheck import OrtQuantizer, ort_quantize, prepare_for_ort
from export.onnx import export_float_onnx
from export.ort import OrtModel
from qcbdefense import agreement, load_dataset, load_model, parse_trigger
from qcbdefense.quant.ptq import calibration_images
from qcbdefense.results import format_table
from qcbdefense.triggers import non_target

# (name, format, per channel, weights, activations, reduce_range): the kinds of file quantize_static makes
CONFIGURATIONS = (
    ("qdq-u8s8-per-channel", "QDQ", True, "QInt8", "QUInt8", False),
    ("qdq-s8s8-per-channel", "QDQ", True, "QInt8", "QInt8", False),
    ("qdq-u8s8-per-tensor", "QDQ", False, "QInt8", "QUInt8", False),
    ("qdq-u8s8-per-channel-reduce-range", "QDQ", True, "QInt8", "QUInt8", True),
    ("qoperator-u8s8-per-channel", "QOperator", True, "QInt8", "QUInt8", False),
)


def main(ckpt: str, model_name: str, data_spec: str, trigger_spec: str, target: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(data_spec)
    trigger, target = parse_trigger(trigger_spec), int(target)
    model = load_model(model_name, ckpt, num_classes=data.num_classes)
    fp_path = export_float_onnx(model, out_dir / "fp.onnx")
    prepared = prepare_for_ort(fp_path, out_dir / "fp-preprocessed.onnx")
    images = calibration_images(data, 512, seed=0)
    triggered, _ = non_target(data.test_x, data.test_y, target)
    fp_preds = OrtModel(fp_path).predict(data.test_x)
    rows = [["fp (float)", *_scores(OrtModel(fp_path), data, fp_preds, triggered, trigger, target)]]
    for name, fmt, per_channel, weights, acts, reduce_range in CONFIGURATIONS:
        path = ort_quantize(prepared, out_dir / f"{name}.onnx", images,
                            OrtQuantizer(name, weights, acts, per_channel), quant_format=fmt,
                            reduce_range=reduce_range, preprocessed=True)
        rows.append([name, *_scores(OrtModel(path), data, fp_preds, triggered, trigger, target)])
    table = format_table(["file", "CA %", "ASR %", "agreement with FP %"], rows)
    (out_dir / "table.md").write_text(table + "\n")
    print(table)


def _scores(model: OrtModel, data, fp_preds, triggered, trigger, target) -> list[float]:
    preds = model.predict(data.test_x)
    asr = (model.predict(triggered, transform=trigger.apply) == target).float().mean().item()
    return [100.0 * (preds == data.test_y).float().mean().item(), 100.0 * asr, agreement(preds, fp_preds)]


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    main(*sys.argv[1:])
