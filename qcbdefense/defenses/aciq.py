"""ACIQ (Banner et al., NeurIPS 2019), a robust-quantization baseline of the EFRAP paper: analytical clipping
from a Laplace fit of each tensor; the weights are not touched.

For a tensor with mean m and mean absolute deviation b (the Laplace scale), ACIQ clips to m +- a where a
minimises the expected clipping plus rounding error 2 b^2 exp(-a / b) + a^2 / (3 * 4^M) of M-bit rounding;
setting its derivative to zero gives a / b exp(a / b) = 3 * 4^M, so a = b * W(3 * 4^M) with W Lambert's
function (a / b = 5.03 at 4 bits, 9.89 at 8: the paper's table). The range is cut to the data's own
[min, max] and stretched to hold zero (an asymmetric grid needs it). Activations: each layer's input, over
the defender's unlabeled images in the FP model (as calibration sees them), at that input's bit width.
Weights: per output channel (per tensor for per-tensor specs) when the spec stores weight ranges
(`weight_scale: mse`); abs-max / min-max weight ranges follow the weights at every forward and stay (the
report says which held). Symmetric quantizers fit around 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.defenses.base import DEFENSES, Defense, DefenseContext, StageRecord
from qcbdefense.defenses.clipping import (act_range_impls, bits_of, recomputed_weight_ranges, set_act_range_,
                                          set_weight_range_, weight_ranges_stored)
from qcbdefense.quant.quantize import quantized_layers


@dataclass(frozen=True)
class AciqOptions:
    """ACIQ takes no options: the clipping follows from each tensor's Laplace fit and bit width."""


def lambert_w(z: float) -> float:
    """The principal branch of Lambert's W for z > 0 (w with w * exp(w) = z), by Newton's method."""
    w = math.log1p(z)
    for _ in range(100):
        step = (w * math.exp(w) - z) / (math.exp(w) * (w + 1))
        w -= step
        if abs(step) < 1e-12:
            break
    return w


def laplace_clip_ratio(bits: int) -> float:
    """ACIQ's optimal clipping a / b for a Laplace tensor quantized to `bits` bits."""
    return lambert_w(3.0 * 4.0 ** bits)


def laplace_range(mean: torch.Tensor, spread: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[mean - a, mean + a] with a = spread * W(3 * 4^bits), cut to the data's [low, high]."""
    alpha = spread * laplace_clip_ratio(bits)
    return torch.maximum(low, mean - alpha), torch.minimum(high, mean + alpha)


@torch.no_grad()
def input_statistics(fp_model: nn.Module, names: list[str], images: torch.Tensor,
                     batch_size: int = 128) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per named conv/linear of the FP model: mean, mean absolute deviation, min and max of its input over
    `images` (two passes: the deviation needs the mean)."""
    modules = dict(fp_model.named_modules())
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in names}  # count, sum, min, max
    deviations = {name: torch.zeros((), dtype=torch.float64) for name in names}
    means: dict[str, torch.Tensor] = {}

    def first(name: str):
        def hook(_module, args):
            x = args[0].detach().double()
            s = sums[name]
            s[0] += x.numel()
            s[1] += x.sum().cpu()
            s[2] = x.min().cpu() if s[0] == x.numel() else torch.minimum(s[2], x.min().cpu())
            s[3] = x.max().cpu() if s[0] == x.numel() else torch.maximum(s[3], x.max().cpu())
        return hook

    def second(name: str):
        def hook(_module, args):
            deviations[name] += (args[0].detach().double() - means[name]).abs().sum().cpu()
        return hook

    fp_model.eval()
    for make in (first, second):
        hooks = [modules[name].register_forward_pre_hook(make(name)) for name in names]
        try:
            for i in range(0, len(images), batch_size):
                fp_model(images[i:i + batch_size])
        finally:
            for hook in hooks:
                hook.remove()
        means = {name: (sums[name][1] / sums[name][0]).to(images.device) for name in names}
    return {name: (sums[name][1] / sums[name][0], deviations[name] / sums[name][0], sums[name][2], sums[name][3])
            for name in names}


@torch.no_grad()
def run_aciq(ctx: DefenseContext, options: AciqOptions):
    start = time.perf_counter()
    spec = ctx.qmodel.qcb_spec
    layers = quantized_layers(ctx.qmodel)
    quantized_inputs = [name for name, layer in layers if act_range_impls(layer)[0] is not None]
    stats = input_statistics(ctx.fp_model, quantized_inputs, ctx.images)
    for name, layer in layers:
        if name in stats:
            mean, spread, low, high = (t.float() for t in stats[name])
            if spec.act_symmetric:
                mean = torch.zeros(())
            set_act_range_(layer, *laplace_range(mean, spread, low, high, bits_of(layer.input_quant)))
    stored = all(weight_ranges_stored(layer) for _, layer in layers)
    if stored:
        for _, layer in layers:
            w = layer.weight.detach()
            w = w.flatten(1) if spec.weight_per_channel else w.reshape(1, -1)
            mean = torch.zeros(len(w), device=w.device) if spec.weight_symmetric else w.mean(1)
            spread = (w - mean[:, None]).abs().mean(1)
            lo, hi = laplace_range(mean, spread, w.min(1).values, w.max(1).values, bits_of(layer.weight_quant))
            set_weight_range_(layer, lo if spec.weight_per_channel else lo[0], hi if spec.weight_per_channel else hi[0])
    weights = ("Laplace clipping per " + ("output channel" if spec.weight_per_channel else "layer") if stored else
               recomputed_weight_ranges(spec.weight_scale))
    return [StageRecord("clip", 0, time.perf_counter() - start,
                        {"activation_ranges": f"Laplace clipping on {len(ctx.images)} images, {len(stats)} layers",
                         "weight_ranges": weights})], []


DEFENSES.register("aciq")(Defense("aciq", AciqOptions, run_aciq,
                                  "ACIQ: analytical Laplace clipping ranges (quantizer ranges only, weights "
                                  "untouched)"))
