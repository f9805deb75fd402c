"""An experiment, not part of the product: why a paper baseline does or does not leave a PQBackdoor QCB alive
(BENCHMARKS.md, baselines). A QCB lives in the rounding of the attacked FP weights: each weight sits where the
victim's round-to-nearest lands on the attacker's integer. A baseline that moves a weight by half a step or more
(or rescales the grid: abs-max ranges follow the weights) re-rolls that weight's rounding; one that moves
nothing by that much keeps the attacker's integers.

For each run (a defence, optionally with options) this prints CA / ASR / RA of the purified model and, against
the round-to-nearest model of the attacked checkpoint: the share of integer weights that changed, the mean
|weight move| in steps of the original grid, and the mean relative change of the weight scales.

Usage (from the repository root):
  python experiments/baseline_grid_moves.py --model small_cnn --ckpt tests/fixtures/pq-small-cnn-builtin.safetensors \\
      --data builtin --spec pqbackdoor-w8a8 --calib 512 ft ft:lr=1e-6 fine-pruning nad i-bau ft-sam omse aciq
A run is METHOD or METHOD:KEY=VALUE,... (purify options; numbers as numbers, the rest as YAML: ft:lr=1e-6,epochs=20).

Public API (`qcbdefense`): load_dataset, load_model, purify, post_training_quantize. Internals:
qcbdefense.quant.integer_weights and quantized_layers (the integers and float weights of each layer).
"""

from __future__ import annotations

import argparse

import torch
import yaml

from qcbdefense import load_dataset, load_model, post_training_quantize, purify
from qcbdefense.quant import integer_weights, quantized_layers
from qcbdefense.results import format_table


def parse_run(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            options[key] = yaml.safe_load(value)
    return method, options


@torch.no_grad()
def grid_moves(before: torch.nn.Module, after: torch.nn.Module) -> dict:
    """Integers changed (%), mean |float weight move| in steps of `before`'s grid, mean relative scale change
    (%), over every quantized layer's weights."""
    ints_before, ints_after = integer_weights(before), integer_weights(after)
    floats_before, floats_after = dict(quantized_layers(before)), dict(quantized_layers(after))
    changed = total = 0
    moves, scale_changes = [], []
    for name, old in ints_before.items():
        new = ints_after[name]
        changed += (old.int_weight != new.int_weight).sum().item()
        total += old.int_weight.numel()
        step = old.scale.expand_as(floats_before[name].weight)
        moves.append(((floats_after[name].weight - floats_before[name].weight).abs() / step).flatten())
        scale_changes.append(((new.scale - old.scale).abs() / old.scale).flatten())
    return {"ints_changed": 100.0 * changed / total, "move_steps": torch.cat(moves).mean().item(),
            "scale_change": 100.0 * torch.cat(scale_changes).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("runs", nargs="+", help="METHOD or METHOD:KEY=VALUE,...")
    args = parser.parse_args()

    data = load_dataset(args.data)
    model = load_model(args.model, args.ckpt)
    nearest = post_training_quantize(model, args.spec, data, calib=args.calib, seed=args.seed)
    cells = []
    for run in args.runs:
        method, options = parse_run(run)
        purified, report = purify(model, data, method=method, spec=args.spec, calib=args.calib, trigger="patch",
                                  seed=args.seed, **options)
        moves = grid_moves(nearest, purified)
        if not cells:
            cells.append(["nearest", f"{report.nearest.ca:.2f}", f"{report.nearest.asr:.2f}",
                          f"{report.nearest.ra:.2f}", "0.00", "0.000", "0.00"])
        score = report.purified
        cells.append([run, f"{score.ca:.2f}", f"{score.asr:.2f}", f"{score.ra:.2f}", f"{moves['ints_changed']:.2f}",
                      f"{moves['move_steps']:.3f}", f"{moves['scale_change']:.2f}"])
        print(f"{run}: CA {score.ca:.2f}, ASR {score.asr:.2f}, {moves}", flush=True)
    print(format_table(["run", "CA %", "ASR %", "RA %", "integers changed %", "mean |move| (steps)",
                        "scale change %"], cells))


if __name__ == "__main__":
    main()
