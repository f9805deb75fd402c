"""What quantization changes on benign data: activation drift per layer and neuron, prediction disagreement.

A QCB is planted so that quantization moves a few neurons a lot (the ones that read the trigger) while the
rest move as rounding noise does. Drift is measured against the FP model's own spread, so layers of
different scale compare, and its concentration (how far the worst neurons stand above the typical one) is
reported beside its size. These are evidence for a human; the verdict rests on the trigger search.

The two models' layers are paired by what they compute: their conv/linear layers in order, which must have the
same weight shapes (`export.replica.weight_layers` for ONNX graphs, `tapped.TappedModel.layers` for native
models). Quantizers rewrite everything else: onnxruntime removes the ReLU behind a quantizer, fuses BN, turns
Conv into QLinearConv; none of that moves a layer's weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch

EPS = 1e-6


class Layer(Protocol):
    """A weight layer as the scan's models list it: its weight's shape and the tensor it is tapped by."""

    weight_shape: tuple[int, ...]
    tensor: str


@dataclass(frozen=True)
class LayerDrift:
    """Drift of one layer's activations: |quantized - FP| / FP std, per channel, over images and positions."""

    layer: int  # the conv/linear layer, counted from the input
    tensor: str  # its output tensor's name in the quantized ONNX graph
    mean: float  # mean over channels
    max: float  # the worst channel
    concentration: float  # max / median over channels: how much one neuron stands out
    top_channels: list[tuple[int, float]]  # the worst channels and their drift

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Disagreement:
    """Where the quantized model's predictions leave the FP model's, and whether they pile onto one class."""

    rate: float  # % of images on which the argmaxes differ
    counts: list[int]  # per class: images the quantized model sends there against the FP model
    pile_class: int  # the class that receives most of the disagreements
    pile_share: float  # % of the disagreements that go to pile_class (100 / classes when spread evenly)

    def to_dict(self) -> dict:
        return asdict(self)


def pair_layers(fp: list[Layer], quantized: list[Layer]) -> tuple[list[tuple[str, str]], str]:
    """(FP tensor, quantized tensor) of each pair of layers, and a sentence saying how they were paired or why
    they could not be (then no pair)."""
    fp_shapes, q_shapes = [t.weight_shape for t in fp], [t.weight_shape for t in quantized]
    if not fp or not quantized:
        which = "FP" if not fp else "quantized"
        return [], (f"cannot pair layers: the {which} graph has no conv/linear layer with constant weights "
                    f"(a quantize_dynamic file multiplies integers, ConvInteger/MatMulInteger, with no scale to "
                    f"compare activations by)")
    if fp_shapes != q_shapes:
        if len(fp) != len(quantized):
            why = f"the FP graph has {len(fp)} conv/linear layers, the quantized graph {len(quantized)}"
        else:
            k = next(i for i, (a, b) in enumerate(zip(fp_shapes, q_shapes)) if a != b)
            why = f"layer {k}'s weights differ in shape ({list(fp_shapes[k])} vs {list(q_shapes[k])})"
        return [], f"cannot pair layers: {why}; the two files are not one network"
    return ([(a.tensor, b.tensor) for a, b in zip(fp, quantized)],
            f"{len(fp)} conv/linear layers paired by order and weight shape")


def channel_drift(fp: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Per-channel drift of two activations [N, C, ...] of the same layer, normalised by the FP spread."""
    dims = [d for d in range(fp.dim()) if d != 1]
    return (quantized - fp).abs().mean(dim=dims) / (fp.std(dim=dims) + EPS)


def layer_drift(index: int, tensor: str, fp: torch.Tensor, quantized: torch.Tensor, top: int = 5) -> LayerDrift:
    drift = channel_drift(fp, quantized)
    values, channels = drift.sort(descending=True)
    return LayerDrift(layer=index, tensor=tensor, mean=drift.mean().item(), max=values[0].item(),
                      concentration=(values[0] / (drift.median() + EPS)).item(),
                      top_channels=[(int(c), float(v)) for c, v in zip(channels[:top], values[:top])])


def disagreement(fp_preds: torch.Tensor, q_preds: torch.Tensor, num_classes: int) -> Disagreement:
    differ = fp_preds != q_preds
    counts = torch.bincount(q_preds[differ], minlength=num_classes)
    total = int(counts.sum())
    pile = int(counts.argmax())
    return Disagreement(rate=100.0 * differ.float().mean().item(), counts=counts.tolist(), pile_class=pile,
                        pile_share=100.0 * counts[pile].item() / total if total else 0.0)
