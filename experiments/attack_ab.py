"""A/B of one short attack recipe between two checkouts: run it here, then with PYTHONPATH at the other
checkout, and compare the printed JSON (CA/ASR of the published FP model and of the victim's W4 PTQ, the
float weights' checksum, and the seconds the training and its quantizer syncs took).

Run: PYTHONPATH=CHECKOUT OMP_NUM_THREADS=1 python experiments/attack_ab.py OUT.json [--steps 32] [--test 1000]
The recipe: CompArtifact W4 (w4a4, c2 = 0.25, sync every 16 steps) from the shared ResNet-20 checkpoint on
the JPEG CIFAR-10, seed 0; the test split is a seeded subset (the victim's PTQ still calibrates on 512
training images).
"""

from __future__ import annotations

import argparse
import json

import torch

from qcbdefense.attacks import attack
from qcbdefense.attacks.base import with_test_subset
from qcbdefense.checkpoints import load_model
from qcbdefense.data import load_dataset
from qcbdefense.training import TrainConfig

CKPT = "../shared/checkpoints/resnet20-cifar10-12fca82f.th"
DATA = "folder:../shared/datasets/cifar10-jpg.tar.gz"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    data = with_test_subset(load_dataset(DATA), args.test, seed=0)
    model = load_model("resnet20", CKPT)
    config = TrainConfig(epochs=5, steps=args.steps, batch_size=128, optimizer="adam", lr=5e-4, weight_decay=1e-4)
    published, report = attack(model, data, method="compartifact", bits=4, spec="w4a4", c2=0.25, config=config,
                               sync_every=16, monitor=0, transfer=(), victim_calib=512)
    weights = torch.cat([p.detach().flatten() for p in published.parameters()])
    w4 = report.quantized[0]
    w4 = getattr(w4, "score", None) or w4.metrics  # SpecResult.metrics before the report model of issue 27
    torch.save(published.state_dict(), args.out + ".weights.pt")
    result = {"fp": [report.fp.ca, report.fp.asr], "w4": [w4.ca, w4.asr],
              "weights_sum": weights.double().sum().item(), "weights_abs_sum": weights.double().abs().sum().item(),
              "seconds": report.seconds, "checks": report.checks, "steps": args.steps, "test": args.test}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
