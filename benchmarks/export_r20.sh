#!/usr/bin/env bash
# The export table on ResNet-20: every purified model of benchmarks/purify_r20.sh exported to ONNX (QCDQ)
# and verified in onnxruntime against the fake-quant model it came from (8-bit ones also with --keep-bn);
# then an int8 file's throughput against the FP32 ONNX of the same model. Run after purify_r20.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
JPG=folder:../shared/datasets/cifar10-jpg.tar.gz
mkdir -p runs/export
for dir in runs/purify/r20-*-*/; do
  name=$(basename "$dir")
  [ -f runs/export/$name.json ] && continue
  case $name in r20-clean-*) ckpt=runs/resnet20-ft/model.pt;; r20-pq-w*) ckpt=runs/attacks/pq-r20-w${name:8:1}/model.pt;; esac
  .venv/bin/qcbdefense export --model resnet20 --ckpt $ckpt --purified $dir --out runs/export/$name.onnx
  .venv/bin/qcbdefense verify runs/export/$name.onnx --data $JPG --trigger patch --max-asr 100 \
    --reference $dir --model resnet20 --min-agreement 99.5 --out runs/export/$name.json | tee runs/export/$name.log || true
done
# the 8-bit files again with BN kept (no integer kernels, closest agreement: BENCHMARKS.md, export)
for dir in runs/purify/r20-pq-w8-*/; do
  name=$(basename "$dir")-keepbn
  [ -f runs/export/$name.json ] && continue
  .venv/bin/qcbdefense export --model resnet20 --ckpt runs/attacks/pq-r20-w8/model.pt --purified $dir --keep-bn \
    --out runs/export/$name.onnx
  .venv/bin/qcbdefense verify runs/export/$name.onnx --data $JPG --trigger patch --max-asr 100 \
    --reference $dir --model resnet20 --min-agreement 99.5 --out runs/export/$name.json | tee runs/export/$name.log || true
done
.venv/bin/qcbdefense export --model resnet20 --ckpt runs/attacks/pq-r20-w8/model.pt --float --out runs/export/fp-pq-w8.onnx
.venv/bin/qcbdefense verify runs/export/r20-pq-w8-lac.onnx --data $JPG --reference runs/export/fp-pq-w8.onnx \
  --min-agreement 0 --throughput | tee runs/export/throughput.log
