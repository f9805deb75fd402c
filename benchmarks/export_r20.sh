#!/usr/bin/env bash
# The export table on ResNet-20: every purified model of benchmarks/purify_r20.sh exported to ONNX (QCDQ)
# and verified in onnxruntime against the fake-quant model it came from (8-bit ones also with --keep-bn);
# then an int8 file's throughput against the FP32 ONNX of the same model. Run after purify_r20.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
JPG=folder:../shared/datasets/cifar10-jpg.tar.gz
mkdir -p runs/export
checkpoint() {  # the FP checkpoint a purified folder came from (runs/purify/r20-MODEL-...)
  case $(basename "$1") in
    r20-clean-*) echo runs/resnet20-ft/model.pt;;
    r20-pq-w4-full-qat4-*) echo runs/attacks/pq-r20-w4-full-qat4/model.pt;;
    r20-pq-w4-full-*) echo runs/attacks/pq-r20-w4-full/model.pt;;
    r20-pq-w8-full-p10e4-*) echo runs/attacks/pq-r20-w8-full-p10e4/model.pt;;
    r20-pq-w8-full-*) echo runs/attacks/pq-r20-w8-full/model.pt;;
    r20-pq-w4-*) echo runs/attacks/pq-r20-w4/model.pt;;
    r20-pq-w8-*) echo runs/attacks/pq-r20-w8/model.pt;;
    r20-compartifact-e5-*) echo runs/attacks/compartifact-r20-e5/model.pt;;
    r20-compartifact-*) echo runs/attacks/compartifact-r20-e10/model.pt;;
    r20-quanti-w4-full-c2h-*) echo runs/attacks/quanti-r20-w4-full-c2h/model.pt;;
    r20-quanti-w4-full-*) echo runs/attacks/quanti-r20-w4-full/model.pt;;
    r20-quanti-w4-*) echo runs/bench/cpu/attacks/quanti-w4/model.pt;;
    *) echo "export_r20.sh: no checkpoint known for $1" >&2; return 1;;
  esac
}
export_and_verify() {  # purified folder, output name, extra export flags
  local dir=$1 name=$2 ckpt; shift 2
  [ -f runs/export/$name.json ] && return 0
  ckpt=$(checkpoint "$dir")
  .venv/bin/qcbdefense export --model resnet20 --ckpt "$ckpt" --purified "$dir" "$@" --out runs/export/$name.onnx
  .venv/bin/qcbdefense verify runs/export/$name.onnx --data $JPG --trigger patch --max-asr 100 \
    --reference "$dir" --model resnet20 --min-agreement 99.5 --out runs/export/$name.json | tee runs/export/$name.log || true
}
for dir in runs/purify/r20-*-*/; do
  export_and_verify "$dir" "$(basename "$dir")"
done
# the 8-bit files again with BN kept (no integer kernels, closest agreement: BENCHMARKS.md, export)
for dir in runs/purify/r20-pq-w8-*/; do
  export_and_verify "$dir" "$(basename "$dir")-keepbn" --keep-bn
done
.venv/bin/qcbdefense export --model resnet20 --ckpt runs/attacks/pq-r20-w8/model.pt --float --out runs/export/fp-pq-w8.onnx
.venv/bin/qcbdefense verify runs/export/r20-pq-w8-lac.onnx --data $JPG --reference runs/export/fp-pq-w8.onnx \
  --min-agreement 0 --throughput | tee runs/export/throughput.log
