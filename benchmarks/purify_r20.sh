#!/usr/bin/env bash
# The purifier table on ResNet-20 (shared JPEG CIFAR-10): the PQBackdoor models of BENCHMARKS.md (issue 4),
# each under the quantizer it targets, and the clean fine-tuned model under w4a4. The -full models (the whole
# training set, stage-1 lr 0.005) and the full-set Qu-ANTI-zation model get every defence.
set -euo pipefail
cd "$(dirname "$0")/.."
JPG=folder:../shared/datasets/cifar10-jpg.tar.gz
run() {  # name ckpt spec method [options...]
  local name=$1 ckpt=$2 spec=$3 method=$4; shift 4
  [ -f runs/purify/$name-$method/report.json ] && return 0
  # a row whose attacked model is not on this machine (see BENCHMARKS.md for its attack command) is skipped
  [ -f "$ckpt" ] || { echo "skip $name-$method: no $ckpt"; return 0; }
  /usr/bin/time -f "%e s wall, %M KB peak RSS" .venv/bin/qcbdefense purify --method $method --model resnet20 \
    --ckpt $ckpt --data $JPG --spec $spec --calib 1024 --trigger patch "$@" --out runs/purify/$name-$method 2>&1 \
    | tr '\r' '\n' | grep -v -E "it/s|s/it" > runs/purify/$name-$method.log
}
for b in 4 8; do
  run r20-pq-w$b runs/attacks/pq-r20-w$b/model.pt pqbackdoor-w${b}a${b} lac
  run r20-pq-w$b runs/attacks/pq-r20-w$b/model.pt pqbackdoor-w${b}a${b} lac-pda --pda-steps 50
done
run r20-clean runs/resnet20-ft/model.pt w4a4 lac
for b in 4 8; do
  run r20-pq-w$b runs/attacks/pq-r20-w$b/model.pt pqbackdoor-w${b}a${b} efrap
done
every_defence() {  # name ckpt spec: LAC, LAC+PDA (50 PDA steps), EFRAP
  run "$1" "$2" "$3" lac
  run "$1" "$2" "$3" lac-pda --pda-steps 50
  run "$1" "$2" "$3" efrap
}
for b in 4 8; do
  every_defence r20-pq-w$b-full runs/attacks/pq-r20-w$b-full/model.pt pqbackdoor-w${b}a${b}
done
every_defence r20-quanti-w4-full runs/attacks/quanti-r20-w4-full/model.pt w4a4  # Qu-ANTI-zation, whole training set
# PQBackdoor W8 with 10 % poison and 4 stage-1 epochs, after the integer-bounds fix (2026-11-30)
run r20-pq-w8-full-p10e4 runs/attacks/pq-r20-w8-full-p10e4/model.pt pqbackdoor-w8a8 lac
# Qu-ANTI-zation with c2 = 0.5 and PQBackdoor W4 with a 4-epoch quantization-aware stage 1 (2026-11-30 afternoon)
every_defence r20-quanti-w4-full-c2h runs/attacks/quanti-r20-w4-full-c2h/model.pt w4a4
every_defence r20-pq-w4-full-qat4 runs/attacks/pq-r20-w4-full-qat4/model.pt pqbackdoor-w4a4
# Qu-ANTI-zation with c2 = 0.25 (2026-11-30 evening)
every_defence r20-quanti-w4-full-c2q runs/attacks/quanti-r20-w4-full-c2q/model.pt w4a4
# Two W4 models under LAC/EFRAP's W8A8 quantizer, where their backdoor stays dormant (2026-11-30 evening)
run r20-quanti-w4-full-c2q-w8a8 runs/attacks/quanti-r20-w4-full-c2q/model.pt w8a8 lac-pda --pda-steps 50
run r20-pq-w4-full-qat4-w8a8 runs/attacks/pq-r20-w4-full-qat4/model.pt w8a8 lac-pda --pda-steps 50
# CompArtifact W4 with c2 = 0.25, also with the trigger search first (sixth session; the c2 = 0.25
# Qu-ANTI-zation model's search rows: experiments/lac_activation_residual.py guided). The -search rows ran before
# the search refined its patch (commit 36820c5), the -refine rows the same command after it.
every_defence r20-compartifact-w4-c2q runs/attacks/compartifact-r20-w4-c2q/model.pt w4a4
for m in compartifact-r20-w4-c2q quanti-r20-w4-full-c2q; do
  [ $m = quanti-r20-w4-full-c2q ] || run r20-$m-search runs/attacks/$m/model.pt w4a4 lac --search-triggers
  [ $m = quanti-r20-w4-full-c2q ] || run r20-$m-search runs/attacks/$m/model.pt w4a4 lac-pda --pda-steps 50 \
    --search-triggers
  run r20-$m-refine runs/attacks/$m/model.pt w4a4 lac --search-triggers
  run r20-$m-refine runs/attacks/$m/model.pt w4a4 lac-pda --pda-steps 50 --search-triggers
done
# PQBackdoor W8 (10 % poison) with the search first (sixth session)
run r20-pq-w8-full-p10e4-refine runs/attacks/pq-r20-w8-full-p10e4/model.pt pqbackdoor-w8a8 lac-pda --pda-steps 50 \
  --search-triggers
# Seventh session. PDA's perturbation reaches its radius in one step (step size = radius = 1e-3; later steps
# can only zero or flip it), so 10 PDA steps instead of 50: the two c2 = 0.25 models with the search, run one at a time
# on the idle CPU for the speed bar.
for m in quanti-r20-w4-full-c2q compartifact-r20-w4-c2q; do
  run r20-$m-pda10 runs/attacks/$m/model.pt w4a4 lac-pda --pda-steps 10 --search-triggers
done
# W8A8 rows for the three W4 models that meet issue 4's bars, under LAC/EFRAP's w8a8 (seventh session): their
# backdoor is dormant (PQBackdoor) or leaks 10 % (the two c2 = 0.25 models) at 8 bits.
for m in pq-r20-w4-full-qat4 quanti-r20-w4-full-c2q compartifact-r20-w4-c2q; do
  run r20-$m-w8a8 runs/attacks/$m/model.pt w8a8 lac
  run r20-$m-w8a8 runs/attacks/$m/model.pt w8a8 efrap
  run r20-$m-w8a8-pda10 runs/attacks/$m/model.pt w8a8 lac-pda --pda-steps 10
  [ $m = pq-r20-w4-full-qat4 ] || run r20-$m-w8a8-search runs/attacks/$m/model.pt w8a8 lac-pda --pda-steps 10 \
    --search-triggers
done
# The 8-bit leak of the two c2 = 0.25 models with the activation ranges learned too (seventh session)
for m in quanti-r20-w4-full-c2q compartifact-r20-w4-c2q; do
  run r20-$m-w8a8-actrange runs/attacks/$m/model.pt w8a8 lac --learn-act-range
  run r20-$m-w8a8-actrange runs/attacks/$m/model.pt w8a8 lac-pda --pda-steps 10 --learn-act-range
done
# Eighth session. The search now falls back to the square scan (scan/square_scan.py) when no patch carries over,
# as at 8 bits: LAC+PDA learning the activation ranges too, on the three W4 models under w8a8 and the clean one.
for m in quanti-r20-w4-full-c2q compartifact-r20-w4-c2q pq-r20-w4-full-qat4; do
  run r20-$m-w8a8-squares runs/attacks/$m/model.pt w8a8 lac-pda --learn-act-range --search-triggers
done
run r20-clean-w8a8-squares runs/resnet20-ft/model.pt w8a8 lac-pda --learn-act-range --search-triggers
# PQBackdoor W8 against PyTorch's per-tensor grid (eighth session), every defence
for method in lac lac-pda efrap; do
  run r20-pq-w8pt runs/attacks/pq-r20-w8pt/model.pt pqbackdoor-w8a8-per-tensor $method
done
# ... and the same without learning the activation ranges (eighth session)
for m in quanti-r20-w4-full-c2q compartifact-r20-w4-c2q; do
  run r20-$m-w8a8-squares-fixedrange runs/attacks/$m/model.pt w8a8 lac-pda --search-triggers
done
