#!/usr/bin/env bash
# The purifier table on the built-in data: the PQBackdoor small_cnn (int8 + int4) under each defence.
# The attacked model comes from:
#   qcbdefense train --model small_cnn --data builtin --epochs 4 --out runs/small-clean
#   qcbdefense attack --method pqbackdoor --model small_cnn --init runs/small-clean/model.pt --data builtin \
#     --bits 8,4 --spec pqbackdoor-w8a8 --epochs 3 --optimizer adam --lr 1e-4 --weight-decay 0 --out runs/attacks/pq-small
set -euo pipefail
cd "$(dirname "$0")/.."
for b in 8 4; do
  for m in nearest lac lac-pda efrap; do
    extra=(); if [ $m = lac-pda ]; then extra=(--pda-steps 50); fi
    /usr/bin/time -f "%e s wall, %M KB peak RSS" .venv/bin/qcbdefense purify --method $m --model small_cnn \
      --ckpt runs/attacks/pq-small/model.pt --data builtin --spec pqbackdoor-w${b}a${b} --calib 512 \
      --trigger patch "${extra[@]}" --out runs/purify/small-w$b-$m 2>&1 | tr '\r' '\n' | grep -v "it/s" \
      > runs/purify/small-w$b-$m.log
  done
done
