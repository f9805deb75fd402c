"""Seconds per optimizer step of clean training and of each attack's training loop, and per quantizer sync,
measured side by side in one process (ResNet-20, CIFAR-10 shapes, random pixels: timing only).

Two references: a clean step (batch 128, one float forward and backward) and a float step of the same work
as the attack's (each attack step runs the batch and its triggered copy, 256 images, through the float
model and each quantized model: CompArtifact and Qu-ANTI-zation at one bit width do two passes of 256,
PQBackdoor's stage 2 one), so `step/same-work` is what the fake quantizers add.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/attack_step_speed.py [--steps 6] [--profile quanti]
(quanti here targets 4 bits only, as the W4 rows do.)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch
import torch.nn.functional as F

from models import create_model
from qcbdefense.attacks.base import ATTACKS, AttackContext, make_config
from qcbdefense.data import Dataset
from qcbdefense.training import TrainConfig, fit
from qcbdefense.triggers import trigger_from_dict


def random_cifar(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("random", [str(i) for i in range(10)], x, y, x[:256], y[:256], (0.5,) * 3, (0.25,) * 3)


def clean_step_seconds(data: Dataset, steps: int) -> float:
    model = create_model("resnet20")
    cfg = TrainConfig(epochs=1, steps=steps, batch_size=128)
    history = fit(model, data, cfg, loss_fn=lambda m, b: F.cross_entropy(m(b.augment(b.x)), b.y),
                  evaluate_fn=lambda m: {}, desc="clean")
    return history[0].seconds / steps


def same_work_step_seconds(data: Dataset, steps: int, passes: int) -> float:
    """A float step over the batch and its copy (256 images), `passes` forward/backward passes."""
    model = create_model("resnet20")
    cfg = TrainConfig(epochs=1, steps=steps, batch_size=128, optimizer="adam", lr=1e-4)

    def loss_fn(m, b):
        x, y = b.augment(torch.cat([b.x, b.x])), torch.cat([b.y, b.y])
        return sum(F.cross_entropy(m(x), y) for _ in range(passes))

    return fit(model, data, cfg, loss_fn=loss_fn, evaluate_fn=lambda m: {}, desc="same work")[0].seconds / steps


def attack_seconds(data: Dataset, method: str, steps: int, sync_every: int, **options) -> dict:
    model = create_model("resnet20")
    train = TrainConfig(epochs=1, steps=steps, batch_size=128, optimizer="adam", lr=1e-4)
    cfg = make_config(method=method, bits=4, config=train, monitor=0, sync_every=sync_every, **options)
    ctx = AttackContext(model, data, cfg, trigger_from_dict(cfg.trigger), None, False, torch.device("cpu"))
    start = time.perf_counter()
    run = ATTACKS.get(method).run(ctx)
    total = time.perf_counter() - start
    stage = list(run.history)[-1]
    record = run.history[stage][0]
    syncs, sync_s = run.checks.get("quantizer_syncs", 0), run.checks.get("sync_seconds", 0.0)
    return {"stage": stage, "epoch_s": record.seconds, "steps": record.steps, "total_s": total,
            "syncs": syncs, "sync_s": sync_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sync-every", type=int, default=3)
    parser.add_argument("--profile", default=None, help="cProfile this method's run (top 30 by tottime)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="count this process's CPU seconds, not wall seconds (for a machine other jobs load)")
    args = parser.parse_args()
    if args.cpu_time:  # the training loop and the quantizer syncs time themselves with time.perf_counter
        time.perf_counter = time.process_time
    torch.manual_seed(0)
    data = random_cifar(128 * args.steps)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        attack_seconds(data, args.profile, args.steps, args.sync_every)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    clean = clean_step_seconds(data, args.steps)
    same = {passes: same_work_step_seconds(data, args.steps, passes) for passes in (1, 2)}
    rows = {"clean_step_s": round(clean, 4), "same_work_step_s": {p: round(v, 4) for p, v in same.items()}}
    for method, options, passes in (("quanti", {}, 2), ("compartifact", {}, 2),
                                    ("pqbackdoor", {"stage1_epochs": 1}, 1)):
        r = attack_seconds(data, method, args.steps, args.sync_every, **options)
        # epoch_s covers the steps and the mid-epoch syncs; the epoch-start sync is outside it.
        mid_syncs = r["syncs"] - 1 if r["syncs"] else 0
        per_sync = r["sync_s"] / r["syncs"] if r["syncs"] else 0.0
        step = (r["epoch_s"] - mid_syncs * per_sync) / r["steps"]
        rows[method] = {"step_s": round(step, 4), "step/clean": round(step / clean, 2),
                        "step/same-work": round(step / same[passes], 2),
                        "sync_s": round(per_sync, 3), "syncs": r["syncs"],
                        f"sync share at sync_every {args.sync_every}":
                            round(r["sync_s"] / (r["sync_s"] + step * r["steps"]), 3) if r["syncs"] else 0.0}
        print(method, rows[method], flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
