"""The integers a deployment would store: per quantized layer, integer weights, scales and zero points.

Brevitas's convention (which ONNX QCDQ export follows): weight ≈ (int_weight - zero_point) * scale, with
int_weight clamped to [qmin, qmax]. Symmetric weights are signed with zero_point 0 ([-7, 7] at 4 bits narrow,
[-8, 7] full); asymmetric weights are unsigned, [0, 2^b - 1], with an integer-valued zero point per scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcbdefense.quant.quantize import quantized_layers


@dataclass
class IntWeights:
    """One layer's quantized weight.

    Attributes:
        int_weight: int32 tensor, the weight's shape, values in [qmin, qmax].
        scale: float tensor broadcastable to int_weight: (C_out, 1, 1, 1) / (C_out, 1) per channel, one
            element per tensor.
        zero_point: the scale's shape (integer-valued floats; zeros when symmetric).
        bits, signed, narrow_range: the integer grid.
    """

    int_weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    narrow_range: bool

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized weight the model computes with."""
        return (self.int_weight.to(self.scale.dtype) - self.zero_point) * self.scale


def integer_weights(qmodel: nn.Module) -> dict[str, IntWeights]:
    """Integer weights of every quantized layer of `qmodel`, by layer name, in execution order.

    Read from Brevitas's `quant_weight()` with the current float weights (no gradient). Weight quantization
    must be enabled (not inside `float_view`).
    """
    result: dict[str, IntWeights] = {}
    with torch.no_grad():
        for name, layer in quantized_layers(qmodel):
            if not layer.weight_quant.is_quant_enabled:
                raise RuntimeError(f"weight quantization of {name!r} is disabled (inside float_view?)")
            quant = layer.quant_weight()
            # Brevitas gives a symmetric quantizer's zero point as a scalar 0: give it the scale's shape
            scale, zero_point = torch.broadcast_tensors(quant.scale.detach(), quant.zero_point.detach())
            result[name] = IntWeights(
                int_weight=quant.int().to(torch.int32),
                scale=scale.clone(),
                zero_point=zero_point.clone(),
                bits=int(quant.bit_width.item()),
                signed=bool(quant.signed),
                narrow_range=bool(layer.weight_quant.is_narrow_range),
            )
    return result
