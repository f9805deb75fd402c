"""What the robust-quantization baselines (OMSE, ACIQ) share: writing a chosen clipping range into a
quantized layer's Brevitas quantizers, leaving every weight as it is.

Brevitas stores an asymmetric range [lo, hi] (lo <= 0 <= hi) as two values: the scaling value hi - lo (the
scale is that over 2^b - 1) and the zero-point value lo (the integer zero point is round(|lo| / scale)); a
symmetric range stores the threshold max(|lo|, |hi|) alone. Activation ranges are always stored (set by
`calibrate`). Weight ranges are stored only when the spec searches them (`weight_scale: mse`, the LAC/EFRAP
evaluation quantizer); abs-max and min/max weight ranges are recomputed from the weights at every forward,
so a defence that only changes ranges cannot change them: `weight_ranges_stored` says which case holds and
the defences record it.
"""

from __future__ import annotations

import torch
from brevitas.core.scaling.standalone import (ParameterFromRuntimeStatsScaling,
                                              ParameterFromStatsFromParameterScaling)
from brevitas.core.zero_point import ParameterFromRuntimeZeroPoint, ParameterFromStatsFromParameterZeroPoint
from torch import nn


def _impls(proxy: nn.Module, scaling_type: type, zero_point_type: type) -> tuple[nn.Module | None, nn.Module | None]:
    scaling = next((m for m in proxy.modules() if isinstance(m, scaling_type)), None)
    zero_point = next((m for m in proxy.modules() if isinstance(m, zero_point_type)), None)
    return scaling, zero_point


def _write(scaling: nn.Module, zero_point: nn.Module | None, lo: torch.Tensor, hi: torch.Tensor) -> None:
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # an asymmetric grid holds zero
    with torch.no_grad():
        if zero_point is None:
            scaling.value.copy_(torch.maximum(-lo, hi).reshape(scaling.value.shape))
        else:
            scaling.value.copy_((hi - lo).clamp_min(1e-8).reshape(scaling.value.shape))
            zero_point.value.copy_(lo.reshape(zero_point.value.shape))


def act_range_impls(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The stored activation range of a quantized layer's input: (scaling, zero point or None); (None, None)
    for a layer whose input is not quantized."""
    if getattr(layer, "input_quant", None) is None:
        return None, None
    return _impls(layer.input_quant, ParameterFromRuntimeStatsScaling, ParameterFromRuntimeZeroPoint)


def set_act_range_(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Clip the layer's input activations to [lo, hi] (scalars; the grid is stretched to hold zero)."""
    scaling, zero_point = act_range_impls(layer)
    _write(scaling, zero_point, lo, hi)


def weight_ranges_stored(layer: nn.Module) -> bool:
    """Whether the layer's weight range is stored (an MSE-searched spec) rather than recomputed each forward."""
    scaling, _ = _impls(layer.weight_quant, ParameterFromStatsFromParameterScaling,
                        ParameterFromStatsFromParameterZeroPoint)
    return scaling is not None


def recomputed_weight_ranges(weight_scale: str) -> str:
    """What a range-only defence reports of weight ranges the spec recomputes from the weights at every forward."""
    return (f"the spec's {weight_scale} ranges, recomputed from the weights at every forward (not replaceable by a "
            f"range-only defence)")


def set_weight_range_(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Clip the layer's weights to [lo, hi] per output channel ([C]) or per tensor (scalars); needs
    `weight_ranges_stored(layer)`."""
    scaling, zero_point = _impls(layer.weight_quant, ParameterFromStatsFromParameterScaling,
                                 ParameterFromStatsFromParameterZeroPoint)
    _write(scaling, zero_point, lo, hi)
    for impl in (scaling, zero_point):
        if impl is not None:
            impl.init_done = True  # no search on the next forward: the range is the one written here


def bits_of(proxy: nn.Module) -> int:
    return int(proxy.bit_width().item())
