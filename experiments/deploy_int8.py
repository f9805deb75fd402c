"""An experiment, not part of the product: the ResNet-20 `w8a8-deploy` file in onnxruntime with 7-bit weights
(the preset, onnxruntime's reduce_range) and with 8-bit weights (the preset before), on the 10,000 CIFAR-10
test images: CA of the fake-quant model and of the file, argmax agreement between them, and the throughput of
each file beside FP32 and `quantize_static`'s file (`export.throughput.compare_throughput`, one thread).
Usage: python experiments/deploy_int8.py OUT   (from the repository root; OUT keeps the files)

Public API: load_dataset, load_model, post_training_quantize, export_onnx, agreement. Internals it needs:
export.ort.OrtModel, export.throughput, qcbdefense.scoring.predict."""
import sys
from pathlib import Path

from export.onnx import export_float_onnx
from export.ort import OrtModel
from export.throughput import compare_throughput
from qcbdefense import agreement, export_onnx, load_dataset, load_model, post_training_quantize
from qcbdefense.quant.spec import get_spec
from qcbdefense.scoring import predict

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/deploy-int8")
out.mkdir(parents=True, exist_ok=True)
data = load_dataset("folder:../shared/datasets/cifar10-jpg.tar.gz")
model = load_model("resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th")
fp = export_float_onnx(model, out / "fp.onnx")
deploy = get_spec("w8a8-deploy")
specs = {"7-bit weights (w8a8-deploy)": deploy,
         "8-bit weights (first layer and image at 7)": deploy.replace(weight_bits=8, first_layer_bits=7,
                                                                      last_layer_bits=8)}
for i, (name, spec) in enumerate(specs.items()):
    qmodel = post_training_quantize(model, spec, data, calib=512)
    path = export_onnx(qmodel, out / f"deploy-{i}.onnx")
    ours = OrtModel(path, threads=1).predict(data.test_x)
    reference = predict(qmodel, data.test_x)
    ca = lambda preds: 100.0 * (preds == data.test_y).float().mean().item()  # noqa: E731
    print(f"{name}: fake-quant CA {ca(reference):.2f} %, file CA {ca(ours):.2f} %, "
          f"agreement {agreement(ours, reference):.2f} % ({int((ours != reference).sum())} images differ)",
          flush=True)
    print(compare_throughput(path, fp, data, threads=1).table(), flush=True)
