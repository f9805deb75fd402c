"""Where the residual backdoor of the LAC-purified c2 = 0.5 Qu-ANTI-zation model lives (BENCHMARKS.md, purifier).

Usage: python benchmarks/lac_activation_residual.py [schedule|split|recalibrate ...]
  schedule     LAC with 1,000 steps a layer and no early stopping, and with 2,048 calibration images
  split        the purified models (benchmarks/purify_r20.sh) with and without their activation quantizers
  recalibrate  the purified models with activation ranges recalibrated on the purified weights
  ablate       the LAC+PDA-purified c2 = 0.5 model with one layer's input quantizer switched off at a time
"""
import sys

from brevitas.graph.calibrate import quantization_status_manager

from qcbdefense.attacks.base import with_test_subset
from qcbdefense.checkpoints import load_model
from qcbdefense.data import load_dataset, to_float
from qcbdefense.defenses import load_purified, purify
from qcbdefense.evaluate import evaluate
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.ptq import calibration_images
from qcbdefense.quant.quantize import quantized_layers
from qcbdefense.triggers import parse_trigger

DATA = load_dataset("folder:../shared/datasets/cifar10-jpg.tar.gz")
TEST = with_test_subset(DATA, 3000, seed=0)
TRIGGER = parse_trigger("patch")
PURIFIED = ("r20-quanti-w4-full-c2h-lac", "r20-quanti-w4-full-c2h-lac-pda", "r20-quanti-w4-full-lac-pda")


def schedule() -> None:
    model = load_model("resnet20", "runs/attacks/quanti-r20-w4-full-c2h/model.pt")
    for name, options in (("1,000 steps, no early stop", dict(steps=1000, early_stop=False)),
                          ("2,048 calibration images", dict(calib=2048))):
        _, report = purify(model, DATA, method="lac", spec="w4a4", trigger=TRIGGER, arch="resnet20", **options)
        print(f"LAC, {name} (full test set):\n{report.table()}", flush=True)


def split() -> None:
    for name in PURIFIED:
        q = load_purified("resnet20", f"runs/purify/{name}")
        both = evaluate(q, TEST, trigger=TRIGGER, target=0)
        with quantization_status_manager(q, disable_act_quant=True, is_training=False):
            weights = evaluate(q, TEST, trigger=TRIGGER, target=0)
        print(f"{name}: w4a4 {both.ca:.2f} / {both.asr:.2f}, float activations {weights.ca:.2f} / {weights.asr:.2f}",
              flush=True)


def recalibrate() -> None:
    images = to_float(calibration_images(DATA, 1024, seed=0))
    for name in PURIFIED[:2]:
        q = load_purified("resnet20", f"runs/purify/{name}")
        calibrate(q, images.split(128))
        r = evaluate(q, TEST, trigger=TRIGGER, target=0)
        print(f"{name}: activation ranges recalibrated {r.ca:.2f} / {r.asr:.2f}", flush=True)


def ablate() -> None:
    q = load_purified("resnet20", f"runs/purify/{PURIFIED[1]}")
    for name, layer in quantized_layers(q):
        layer.input_quant.disable_quant = True
        r = evaluate(q, TEST, trigger=TRIGGER, target=0)
        layer.input_quant.disable_quant = False
        print(f"{PURIFIED[1]}, {name} input in float: {r.ca:.2f} / {r.asr:.2f}", flush=True)


if __name__ == "__main__":
    steps = {"schedule": schedule, "split": split, "recalibrate": recalibrate, "ablate": ablate}
    for step in sys.argv[1:] or list(steps):
        steps[step]()
