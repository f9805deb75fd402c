#!/usr/bin/env bash
# Our LAC schedule (early stopping on the reconstruction loss) against the released one (10,000 Adam steps a
# layer, no early stopping), one after the other on the same attacked ResNet-20 and quantizer.
set -euo pipefail
cd "$(dirname "$0")/.."
JPG=folder:../shared/datasets/cifar10-jpg.tar.gz
mkdir -p runs/schedule
for mode in ours released; do
  extra=(); [ $mode = released ] && extra=(--released)
  /usr/bin/time -f "%e s wall, %M KB peak RSS" .venv/bin/qcbdefense purify --method lac --model resnet20 \
    --ckpt runs/attacks/pq-r20-w4/model.pt --data $JPG --spec pqbackdoor-w4a4 --calib 1024 --trigger patch \
    "${extra[@]}" --out runs/schedule/$mode 2>&1 | tr '\r' '\n' | grep -v "it/s" > runs/schedule/$mode.log
done
