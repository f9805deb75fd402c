#!/usr/bin/env bash
# A model from outside the zoo through every command, as a new user runs it from the README (issue 22):
# train a few epochs on the built-in data, quantize, purify (LAC+PDA, default schedule), export the purified
# model, verify it in onnxruntime, scan, harden; then the same from the model's FP ONNX export as the model.
#   bash benchmarks/outside_models.sh torchvision:mobilenet_v3_small runs/outside/mnv3 [EPOCHS [TRAIN OPTIONS...]]
# EfficientNet-B0 trains without its stochastic depth and dropout (at chance with them after 4 epochs):
#   bash benchmarks/outside_models.sh 'torchvision:efficientnet_b0(stochastic_depth_prob=0.0,dropout=0.0)' OUT 6 \
#     --optimizer adam --lr 1e-3 --weight-decay 0
# Each command's summary lines go to OUT/chain.log, with its wall seconds and peak memory; a command that fails
# (a gate, say) is logged and the chain goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1 OUT=$2 EPOCHS=${3:-4}
shift $(( $# < 3 ? $# : 3 ))  # what is left: train's options
mkdir -p "$OUT"
LOG=$OUT/chain.log
D=(--data builtin --trigger patch)
run() {  # one command: its line, then its output without progress bars
  echo "+ qcbdefense $*" | tee -a "$LOG"
  { /usr/bin/time -f "  (%e s wall, %M KB peak)" .venv/bin/qcbdefense "$@" 2>&1 || true; } | tr '\r' '\n' \
    | grep -v -E "it/s|s/it|Warning|warn|^\s*$" | tail -n 25 | tee -a "$LOG"
}
chain() {  # $1: the model reference; the rest: how to give its weights
  local model=$1 tag=$2; shift 2
  run quantize --model "$model" "$@" "${D[@]}" --spec w8a8 --spec w4a4 --out "$OUT/$tag-quantize.json"
  run purify --method lac-pda --model "$model" "$@" "${D[@]}" --spec w8a8 --out "$OUT/$tag-purified"
  run export --model "$model" "$@" --purified "$OUT/$tag-purified" --out "$OUT/$tag-purified.onnx"
  run verify "$OUT/$tag-purified.onnx" "${D[@]}" --reference "$OUT/$tag-purified" --out "$OUT/$tag-verify.json"
  run scan --fp "${SCAN_FP[@]}" --spec w8a8 --data builtin --out "$OUT/$tag-scan"
  run harden --model "$model" "$@" "${D[@]}" --spec w8a8 --out "$OUT/$tag-hardened.onnx"
}
if [[ -f $OUT/fp/report.json ]]; then  # trained already (a chain stopped after training): reuse it
  echo "+ reusing $OUT/fp (trained earlier)" | tee -a "$LOG"
else
  run train --model "$MODEL" --data builtin --epochs "$EPOCHS" "$@" --out "$OUT/fp"
fi
SCAN_FP=("$OUT/fp/model.pt" --model "$MODEL")
chain "$MODEL" ckpt --ckpt "$OUT/fp/model.pt"
run export --model "$MODEL" --ckpt "$OUT/fp/model.pt" --float --out "$OUT/fp.onnx"
SCAN_FP=("$OUT/fp.onnx")
chain "$OUT/fp.onnx" onnx
