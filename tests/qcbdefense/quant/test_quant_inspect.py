"""integer_weights: the stored integers sit on exactly the grid each spec promises, at the promised scales."""

from __future__ import annotations

import pytest
import torch

from qcbdefense.quant import SPECS, QuantSpec, float_view, get_spec, integer_weights, quantize

CUSTOM = {
    "sym-narrow-absmax-w4": QuantSpec(weight_bits=4, weight_symmetric=True, weight_narrow_range=True,
                                      weight_scale="absmax", first_layer_bits=None, last_layer_bits=None),
    "sym-full-absmax-w4": QuantSpec(weight_bits=4, weight_symmetric=True, weight_narrow_range=False,
                                    weight_scale="absmax", first_layer_bits=None, last_layer_bits=None),
    "sym-narrow-mse-w3": QuantSpec(weight_bits=3, weight_symmetric=True, weight_scale="mse",
                                   weight_per_channel=False, first_layer_bits=6, last_layer_bits=None),
    "asym-minmax-w2": QuantSpec(weight_bits=2, weight_scale="minmax", first_layer_bits=None,
                                last_layer_bits=5),
}
SPEC_CASES = {**{name: get_spec(name) for name in SPECS.names()}, **CUSTOM}


def _grid(spec: QuantSpec, bits: int) -> tuple[int, int]:
    if not spec.weight_symmetric:
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)) + spec.weight_narrow_range, 2 ** (bits - 1) - 1


@pytest.mark.parametrize("case", SPEC_CASES)
def test_integer_grid_scales_and_bits(case, tiny):
    spec = SPEC_CASES[case]
    qmodel = quantize(tiny, spec)
    weights = integer_weights(qmodel)
    assert list(weights) == ["conv1", "conv2", "fc"]
    expected_bits = {"conv1": spec.first_bits, "conv2": spec.weight_bits, "fc": spec.last_bits}
    for name, w in weights.items():
        layer = getattr(qmodel, name)
        assert w.bits == expected_bits[name]
        assert w.int_weight.dtype == torch.int32 and w.int_weight.shape == layer.weight.shape
        low, high = _grid(spec, w.bits)
        assert (w.qmin, w.qmax) == (low, high)
        assert low <= w.int_weight.min() and w.int_weight.max() <= high
        assert w.signed == spec.weight_symmetric
        assert torch.equal(w.zero_point, torch.round(w.zero_point))
        if spec.weight_symmetric:
            assert torch.all(w.zero_point == 0)
        assert w.scale.numel() == (layer.weight.shape[0] if spec.weight_per_channel else 1)
        assert w.zero_point.shape == w.scale.shape
        # scale * (int - zero point) is exactly the fake-quantized weight the layer computes with
        assert torch.allclose(w.dequantize(), layer.quant_weight().value, rtol=0, atol=1e-6)


def _absmax(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel:
        return weight.detach().abs().flatten(1).amax(1)
    return weight.detach().abs().max().reshape(1)


@pytest.mark.parametrize("case, divisor", [
    ("quanti-w4a4", lambda b: 2 ** (b - 1) - 1),
    ("quanti-w8a8", lambda b: 2 ** (b - 1) - 1),
    ("sym-full-absmax-w4", lambda b: 2 ** (b - 1) - 1),      # the rule holds whatever the clamp range
    ("pqbackdoor-w8a8", lambda b: 2 ** (b - 1) - 0.5),       # 127.5
    ("pqbackdoor-w4a4", lambda b: 2 ** (b - 1) - 0.5),
])
def test_absmax_scale_rules(case, divisor, tiny):
    spec = SPEC_CASES[case]
    for name, w in integer_weights(quantize(tiny, spec)).items():
        weight = getattr(tiny, name).weight
        expected = _absmax(weight, spec.weight_per_channel) / divisor(w.bits)
        assert torch.allclose(w.scale.flatten(), expected, rtol=1e-6, atol=0), name
        # the abs-max element lands on the top of the grid (127.5 rounds to 128, clamped to 127)
        top = _absmax(w.int_weight, spec.weight_per_channel)
        assert torch.all(top >= 2 ** (w.bits - 1) - 1), name


def test_pqbackdoor_uses_the_full_signed_range(tiny):
    """PQBackdoor's grid is PyTorch's qint8: abs-max / 127.5 sends the most negative weight to -128."""
    with torch.no_grad():
        tiny.conv2.weight[0, 0, 0, 0] = -tiny.conv2.weight[0].abs().max() - 1.0
    w = integer_weights(quantize(tiny, "pqbackdoor-w8a8"))["conv2"]
    assert w.int_weight[0, 0, 0, 0] == -128


def test_minmax_scale_rule(tiny):
    spec = CUSTOM["asym-minmax-w2"]
    for name, w in integer_weights(quantize(tiny, spec)).items():
        weight = getattr(tiny, name).weight.detach().flatten(1)
        low = weight.amin(1).clamp(max=0)
        expected = (weight.amax(1) - low) / (2 ** w.bits - 1)
        assert torch.allclose(w.scale.flatten(), expected, rtol=1e-6, atol=0), name
        assert torch.equal(w.zero_point.flatten(), torch.round(-low / w.scale.flatten()))


def test_disabled_weight_quant_is_refused(tiny):
    qmodel = quantize(tiny, "w8a8")
    with float_view(qmodel), pytest.raises(RuntimeError, match="float_view"):
        integer_weights(qmodel)
