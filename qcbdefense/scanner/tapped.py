"""A PyTorch model as the scan runs it: logits, and on request the output of each of its weight layers.

The scan compares two models layer by layer (`drift`). An ONNX file runs as `export.replica.OnnxReplica`, which
names its weight layers and returns their tensors; a native model (an FP checkpoint and its Brevitas fake-quant
copy) runs as itself, wrapped here so that it answers the same two questions: `layers` (each conv/linear layer's
weight shape and name; a quantized layer's held-range view, `quant.held_view`, is one) and
`model(x, taps=True)` (the logits and the tapped layers' outputs).

A layer is tapped at its own output, before its BatchNorm: drift is measured per channel against the FP
model's spread (`drift.channel_drift`), so the per-channel scale and shift of a BN (or of a BN folded into a
quantized conv) leave it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.quant.held_view import HeldQuantLayer
from qcbdefense.scanner.folded import fold_batchnorm


@dataclass(frozen=True)
class WeightLayer:
    """A conv/linear layer of a native model: its weight's shape (a linear's in either layout, as the ONNX
    replica lists a Gemm's) and its module name, the name its output is tapped by."""

    weight_shape: tuple[int, ...]
    tensor: str


class TappedModel(nn.Module):
    """`model` in eval mode; `self(x)` gives its logits, `self(x, taps=True)` also the outputs of the layers
    named in `taps` (module names, from `layers`). Given `example` images, a copy with its BatchNorms folded
    (`folded.fold_batchnorm`) answers wherever a gradient to the input is wanted: the searches' steps."""

    def __init__(self, model: nn.Module, example: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.taps: list[str] = []
        self.layers = [WeightLayer(_shape(module), name) for name, module in model.named_modules()
                       if isinstance(module, (nn.Conv2d, nn.Linear, HeldQuantLayer))]
        self.folded = None if example is None else fold_batchnorm(self.model, example)

    def forward(self, x: torch.Tensor, taps: bool = False):
        if not taps:
            steered = self.folded is not None and torch.is_grad_enabled() and x.requires_grad
            return (self.folded if steered else self.model)(x)
        modules = dict(self.model.named_modules())
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_module, _inputs, output):
                outputs[name] = getattr(output, "value", output)  # a Brevitas QuantTensor holds its floats there
            return hook

        handles = [modules[name].register_forward_hook(keep(name)) for name in self.taps]
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, outputs


def _shape(module: nn.Module) -> tuple[int, ...]:
    shape = tuple(module.weight.shape)
    return tuple(sorted(shape)) if len(shape) == 2 else shape
