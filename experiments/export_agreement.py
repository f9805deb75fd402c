"""An experiment, not part of the product: where the 8-bit ONNX files lose argmax agreement with PyTorch: the
purified W8 ResNet-20 exported with each of export.onnx's two rewrites on or off, and the default file under
onnxruntime's optimisation levels (BENCHMARKS.md, export).
Usage: python experiments/export_agreement.py [PURIFIED_DIR]   (from the repository root, after
benchmarks/purify_r20.sh), or python experiments/export_agreement.py --ptq SPEC (the shared ResNet-20 quantized
under SPEC by round to nearest, 512 calibration images: the deployment presets)

Public API (`qcbdefense`): load_dataset, load_purified, export_onnx, agreement. Internals it needs: export.ort.OrtModel
and onnxruntime sessions (to run a file at a chosen optimisation level), qcbdefense.scoring.predict,
qcbdefense.data.to_float, and for --ptq qcbdefense.checkpoints.load_model and quant.ptq.post_training_quantize."""
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.ort import OrtModel
from qcbdefense import agreement, export_onnx, load_dataset, load_purified
from qcbdefense.checkpoints import load_model
from qcbdefense.data import to_float
from qcbdefense.quant.ptq import post_training_quantize
from qcbdefense.scoring import predict

data = load_dataset("folder:../shared/datasets/cifar10-jpg.tar.gz")
x = data.test_x
if sys.argv[1:2] == ["--ptq"]:
    fp = load_model("resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th")
    model = post_training_quantize(fp, sys.argv[2], data, calib=512, seed=0)
else:
    model = load_purified("resnet20", sys.argv[1] if len(sys.argv) > 1 else "runs/purify/r20-pq-w8-lac")
reference = predict(model, x)
pixels = to_float(x).numpy().astype(np.float32)


def argmax(run) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([run(pixels[i:i + 500]).argmax(1) for i in range(0, len(pixels), 500)]))


with tempfile.TemporaryDirectory() as tmp:
    for fold_bn, int_bias in ((False, False), (False, True), (True, False), (True, True)):
        path = export_onnx(model, Path(tmp) / f"{fold_bn}-{int_bias}.onnx", fold_bn=fold_bn, int_bias=int_bias)
        preds = argmax(OrtModel(path, threads=2).logits)
        print(f"fold_bn={fold_bn!s:5} int_bias={int_bias!s:5} agreement {agreement(preds, reference):.2f} %")
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        preds = argmax(lambda batch: session.run(None, {name: batch})[0])
        print(f"default file, {level}: agreement {agreement(preds, reference):.2f} %")
