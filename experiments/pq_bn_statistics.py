"""An experiment, not part of the product: does the PQBackdoor fixture's FP model stay clean only through its
BatchNorm running statistics? PQBackdoor's stage 2 fine-tunes with BN statistics frozen (`freeze_bn`), so the
stored statistics may no longer match what the weights produce. Here the statistics are recomputed on the
defenders' 5 % labelled share (the FP-model baselines do this while fine-tuning in train mode), the weights
untouched, and the FP model and its pqbackdoor-w8a8 round-to-nearest model are scored before and after.

Usage (from the repository root): python experiments/pq_bn_statistics.py

Public API (`qcbdefense`): load_dataset, load_model, evaluate, post_training_quantize, parse_trigger.
Internals: qcbdefense.defenses.finetune.labelled_share (the baselines' labelled share),
qcbdefense.clean_training.recompute_batchnorm_statistics (what `train` does for slow BatchNorms).
"""

import copy

import torch

from qcbdefense import evaluate, load_dataset, load_model, parse_trigger, post_training_quantize
from qcbdefense.clean_training import recompute_batchnorm_statistics
from qcbdefense.defenses.finetune import labelled_share

FIXTURE = "tests/fixtures/pq-small-cnn-builtin.safetensors"


def with_recomputed_bn(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """A copy of `model` whose BN running statistics are the plain average over `images` (weights as they are)."""
    fresh = copy.deepcopy(model)
    recompute_batchnorm_statistics(fresh, images, batch_size=128)
    return fresh.eval()


def main() -> None:
    data = load_dataset("builtin")
    trigger = parse_trigger("patch")
    model = load_model("small_cnn", FIXTURE)
    images, _ = labelled_share(data, 0.05, 0)
    for name, candidate in (("attacked", model), ("BN statistics recomputed", with_recomputed_bn(model, images))):
        fp = evaluate(candidate, data, trigger=trigger, target=0)
        nearest = post_training_quantize(candidate, "pqbackdoor-w8a8", data, calib=512)
        quantized = evaluate(nearest, data, trigger=trigger, target=0)
        print(f"{name}: FP CA {fp.ca:.2f} ASR {fp.asr:.2f}; pqbackdoor-w8a8 nearest CA {quantized.ca:.2f} "
              f"ASR {quantized.asr:.2f}", flush=True)


if __name__ == "__main__":
    main()
