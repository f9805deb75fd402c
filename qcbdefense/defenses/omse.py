"""OMSE (Choukroun et al., ICCVW 2019), a robust-quantization baseline of the EFRAP paper: clipping ranges
that minimise the quantization MSE; the weights are not touched.

Activations: every layer's input range becomes the one Brevitas's MSE calibration finds on the defender's
unlabeled images (the spec with `act_calibration: mse`), in place of the spec's own rule. Weights: a spec
whose weight ranges are searched (`weight_scale: mse`, the LAC/EFRAP evaluation quantizer) already holds the
MSE range, so they stay; abs-max / min-max weight ranges follow the weights at every forward and cannot be
replaced by a range-only defence (the report says which held).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext, StageRecord
from qcbdefense.defenses.clipping import act_range_impls, recomputed_weight_ranges, weight_ranges_stored
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.quantize import quantize, quantized_layers


@dataclass(frozen=True)
class OmseOptions:
    """OMSE takes no options: the ranges are the MSE-optimal ones."""


@torch.no_grad()
def run_omse(ctx: DefenseContext, options: OmseOptions):
    start = time.perf_counter()
    spec = ctx.qmodel.qcb_spec
    reference = quantize(ctx.fp_model, spec.replace(act_calibration="mse")).to(ctx.device)
    calibrate(reference, (ctx.images[i:i + 128] for i in range(0, len(ctx.images), 128)))
    searched = dict(quantized_layers(reference))
    changed = 0
    for name, layer in quantized_layers(ctx.qmodel):
        scaling, zero_point = act_range_impls(layer)
        if scaling is None:
            continue
        ref_scaling, ref_zero_point = act_range_impls(searched[name])
        scaling.value.copy_(ref_scaling.value)
        if zero_point is not None:
            zero_point.value.copy_(ref_zero_point.value)
        changed += 1
    stored = all(weight_ranges_stored(layer) for _, layer in quantized_layers(ctx.qmodel))
    weights = ("the spec's MSE-searched ranges (already OMSE's)" if stored else
               recomputed_weight_ranges(spec.weight_scale))
    return [StageRecord("clip", 0, time.perf_counter() - start,
                        {"activation_ranges": f"MSE on {len(ctx.images)} images, {changed} layers",
                         "weight_ranges": weights})], []


DEFENSES.register("omse")(Defense("omse", OmseOptions, run_omse,
                                  "OMSE: MSE-optimal clipping ranges (quantizer ranges only, weights untouched)"))
