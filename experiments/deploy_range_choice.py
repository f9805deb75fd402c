"""An experiment, not part of the product: where does a QCB aimed at `w8a8-deploy` live among the activation
ranges of ResNet-20, and does widening them per quantizer (not by one factor) meet issue 23's gate?

    python experiments/deploy_range_choice.py one-at-a-time CKPT TARGET          # round to nearest, 1,000 images
    python experiments/deploy_range_choice.py split CKPT TARGET FACTOR EARLY_FACTOR  # LAC+PDA, the test split
    python experiments/deploy_range_choice.py equalized CKPT TARGET               # round to nearest, 1,000 images

`one-at-a-time`: each range but the image's widened 3x alone, CA / ASR of the round-to-nearest model (and all
of them at once). `split`: LAC+PDA (harden's defence) with the ranges widened by FACTOR, except the three whose
widening alone cost most clean accuracy on the measured model (`EARLY`: the first block's), widened by EARLY_FACTOR.
`equalized`: the ranges before and after `quant.equalize.equalize_activations` (on the calibration images purify
uses), and CA / ASR of the round-to-nearest model at the calibrated ranges and all of them 3x, both ways.

Public API: purify, post_training_quantize, evaluate, quant.calibrate.ranges_but_image (what `widen_ranges`
scales), quant.equalize.equalize_activations; a per-quantizer widening is patched into purify in place of
`widen_ranges`.
"""
import sys

import torch

import qcbdefense.defenses.base as defense_base
from qcbdefense.checkpoints import load_model
from qcbdefense.data import load_dataset, to_float
from qcbdefense.defenses import purify
from qcbdefense.quant.calibrate import ranges_but_image
from qcbdefense.quant.equalize import equalize_activations
from qcbdefense.quant.ptq import calibration_images, post_training_quantize
from qcbdefense.scoring import evaluate
from qcbdefense.triggers import parse_trigger

DATA, SPEC, CALIB = "folder:../shared/datasets/cifar10-jpg.tar.gz", "w8a8-deploy", 1024
EARLY = {"layer1.0.conv2.input_quant", "add_quant_0.act_quant", "add_quant_1.act_quant"}


def widen(qmodel: torch.nn.Module, factor_of) -> None:
    """Widen each range by `factor_of(its quantizer's name)`, from the calibrated range (kept aside the first
    time), so that widening again replaces the last widening exactly."""
    with torch.no_grad():
        for name, stats in ranges_but_image(qmodel).items():
            for module in stats:
                if not hasattr(module, "calibrated"):
                    module.calibrated = module.value.detach().clone()
                module.value.copy_(module.calibrated * factor_of(name))


def one_at_a_time(model, data, trigger, target) -> None:
    data.test_x, data.test_y = data.test_x[:1000], data.test_y[:1000]
    qmodel = post_training_quantize(model, SPEC, data, calib=CALIB)

    def line(tag: str) -> None:
        score = evaluate(qmodel, data, trigger=trigger, target=target)
        print(f"{tag:32s} CA {score.ca:6.2f}  ASR {score.asr:6.2f}", flush=True)

    line("nearest")
    for name in ranges_but_image(qmodel):
        widen(qmodel, lambda n: 3.0 if n == name else 1.0)
        line(f"{name} 3x")
    widen(qmodel, lambda n: 3.0)
    line("all 3x")


def split(model, data, trigger, target, factor: float, early_factor: float) -> None:
    defense_base.widen_ranges = lambda qmodel, _: widen(qmodel, lambda n: early_factor if n in EARLY else factor)
    _, report = purify(model, data, method="lac-pda", spec=SPEC, calib=CALIB, trigger=trigger, target=target,
                       act_headroom=2.0)  # any factor but 1, so that purify calls the patched widen_ranges
    print(f"ranges {factor:g}x, first block's {early_factor:g}x: FP {report.fp.ca:.2f} / {report.fp.asr:.2f}, "
          f"nearest {report.nearest.ca:.2f} / {report.nearest.asr:.2f}, "
          f"LAC+PDA {report.purified.ca:.2f} / {report.purified.asr:.2f} (CA / ASR %)", flush=True)


def equalized(model, data, trigger, target) -> None:
    data.test_x, data.test_y = data.test_x[:1000], data.test_y[:1000]
    fp = evaluate(model, data, trigger=trigger, target=target)
    print(f"FP CA {fp.ca:6.2f}  ASR {fp.asr:6.2f}")
    for tag in ("calibrated", "equalized"):
        if tag == "equalized":
            scales = equalize_activations(model, to_float(calibration_images(data, CALIB, seed=0)).split(256))
            print(f"equalized: {sum(s > 1 for layer in scales.values() for s in layer)} output channels of "
                  f"{len(scales)} layers, divided by up to {max(max(layer) for layer in scales.values()):.1f}")
        qmodel = post_training_quantize(model, SPEC, data, calib=CALIB)
        ranges = {name: float(stats[0].value.max()) for name, stats in ranges_but_image(qmodel).items()}
        print(f"{tag}: widest ranges " + ", ".join(f"{name} {value:.1f}" for name, value in
                                                   sorted(ranges.items(), key=lambda kv: -kv[1])[:4]))
        for factor in (1.0, 3.0):
            widen(qmodel, lambda n: factor)
            score = evaluate(qmodel, data, trigger=trigger, target=target)
            print(f"{tag} ranges {factor:g}x: CA {score.ca:6.2f}  ASR {score.asr:6.2f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    step, ckpt, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, data, trigger = load_model("resnet20", ckpt), load_dataset(DATA), parse_trigger("patch")
    if step == "one-at-a-time":
        one_at_a_time(model, data, trigger, target)
    elif step == "equalized":
        equalized(model, data, trigger, target)
    else:
        split(model, data, trigger, target, float(sys.argv[4]), float(sys.argv[5]))
