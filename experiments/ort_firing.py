"""Which configurations of onnxruntime's `quantize_static` wake a QCB planted against a given quantizer.

A deployer who quantizes a stranger's FP model with onnxruntime picks ORT's grid, not the attacker's, and the
two differ in what decides whether the backdoor fires: `quant_pre_process` folds BN into the convs before
quantizing; symmetric int8 weights take abs-max / 127 on [-127, 127] (PQBackdoor's grid is / 127.5); uint8
activations are calibrated by min / max; every tensor is quantized (the input and the adds too). A per-channel
symmetric scale commutes with BN folding (BN multiplies a channel and its abs-max by the same factor), so an
attack aimed at ORT's per-channel grid (the `ort-w8a8` preset) survives the folding; a per-tensor grid
does not, nor does `reduce_range` (7-bit weights).

Runs `export.crosscheck.crosscheck` over them: writes OUT/fp.onnx, one OUT/<configuration>.onnx each, and
OUT/table.md (CA, ASR, agreement with the FP file).
Scan the pair that fires with `qcbdefense scan --fp OUT/fp.onnx --quantized OUT/<configuration>.onnx`.

Usage: python experiments/ort_firing.py CKPT MODEL DATA TRIGGER TARGET OUT
"""

import sys
from pathlib import Path

from export.crosscheck import OrtQuantizer, crosscheck, crosscheck_table
from qcbdefense import load_dataset, load_model, parse_trigger

# the kinds of file quantize_static makes (QInt8 weights)
CONFIGURATIONS = (
    OrtQuantizer("qdq-u8s8-per-channel", "QInt8", "QUInt8"),
    OrtQuantizer("qdq-s8s8-per-channel", "QInt8", "QInt8"),
    OrtQuantizer("qdq-u8s8-per-tensor", "QInt8", "QUInt8", per_channel=False),
    OrtQuantizer("qdq-u8s8-per-channel-reduce-range", "QInt8", "QUInt8", reduce_range=True),
    OrtQuantizer("qoperator-u8s8-per-channel", "QInt8", "QUInt8", quant_format="QOperator"),
)


def main(ckpt: str, model_name: str, data_spec: str, trigger_spec: str, target: str, out: str) -> None:
    data = load_dataset(data_spec)
    model = load_model(model_name, ckpt, num_classes=data.num_classes)
    rows = crosscheck(model, data, trigger=parse_trigger(trigger_spec), target=int(target), calib=512,
                      quantizers=CONFIGURATIONS, keep_dir=out)
    table = crosscheck_table(rows)
    (Path(out) / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    main(*sys.argv[1:])
