"""An experiment, not part of the product: issue 23's speed bar. The files `harden --spec w8a8-deploy` made of
ResNet-20 (shared checkpoint) and torchvision resnet18 (trained 3 epochs on the shared CIFAR-10 at 32x32:
`qcbdefense train --model torchvision:resnet18 --data D --epochs 3 --out R18`), timed against the FP32 file and
`quantize_static`'s file of the same FP model (`export.throughput.compare_throughput`), at 1 and 2 threads.
Usage: python experiments/deploy_speed.py R20_HARDENED.onnx R18_CKPT R18_HARDENED.onnx OUT
(from the repository root), the hardened files from
`qcbdefense harden --model M --ckpt C --data D --spec w8a8-deploy --method lac --trigger patch --min-agreement 99.5
--out F.onnx`.

Public API: load_dataset, load_model. Internals it needs: export.onnx.export_float_onnx, export.throughput."""
import sys
from pathlib import Path

from export.onnx import export_float_onnx
from export.throughput import compare_throughput
from qcbdefense import load_dataset, load_model

r20_file, r18_ckpt, r18_file, out = sys.argv[1:5]
out = Path(out)
out.mkdir(parents=True, exist_ok=True)
data = load_dataset("folder:../shared/datasets/cifar10-jpg.tar.gz")
for arch, ckpt, hardened in (("resnet20", "../shared/checkpoints/resnet20-cifar10-12fca82f.th", r20_file),
                             ("torchvision:resnet18", r18_ckpt, r18_file)):
    fp = export_float_onnx(load_model(arch, ckpt), out / f"{arch.replace(':', '-')}-fp.onnx")
    for threads in (1, 2):
        result = compare_throughput(hardened, fp, data, threads=threads)
        print(f"{arch}, {threads} thread(s)\n{result.table()}", flush=True)
