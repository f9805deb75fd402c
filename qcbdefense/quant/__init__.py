"""Quantizers as data (QuantSpec), turned into Brevitas fake-quantized models that share the float weights."""

from qcbdefense.quant.calibrate import calibrate, float_view, is_calibrated, widen_ranges
from qcbdefense.quant.inspect import IntWeights, integer_weights
from qcbdefense.quant.quantize import (quantize, quantized_layers, quantizer_parameters,
                                       refresh_weight_ranges)
from qcbdefense.quant.spec import SPECS, QuantSpec, get_spec

__all__ = [
    "QuantSpec", "SPECS", "get_spec",
    "quantize", "quantized_layers", "quantizer_parameters", "refresh_weight_ranges",
    "calibrate", "float_view", "is_calibrated", "widen_ranges",
    "IntWeights", "integer_weights",
]
