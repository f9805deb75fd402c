"""calibrate: activation ranges from clean batches, fixed afterwards, also while training through the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from qcbdefense.errors import InputError
from qcbdefense.quant import (QuantSpec, calibrate, float_view, is_calibrated, quantize, quantized_layers,
                              quantizer_parameters, widen_ranges)
from qcbdefense.quant.calibrate import kth_smallest


def test_calibration_turns_garbage_into_float(warm, rel_error):
    torch.manual_seed(0)
    x = torch.rand(128, 3, 32, 32)
    model = warm(create_model("small_cnn"), x)
    ref = model(x)
    qmodel = quantize(model, "w8a8")
    assert not is_calibrated(qmodel)
    raw = qmodel(x)
    assert rel_error(raw, ref) > 0.3
    assert calibrate(qmodel, x.split(32)) is qmodel and not qmodel.training
    assert is_calibrated(qmodel)
    out = qmodel(x)
    assert rel_error(out, ref) < 0.03
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert (raw.argmax(1) == ref.argmax(1)).float().mean() < 0.6


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rule", ["minmax", "percentile", "mse"])
def test_every_calibration_rule(rule, symmetric, tiny, pixels, rel_error):
    spec = QuantSpec(weight_bits=8, act_bits=8, act_symmetric=symmetric, act_calibration=rule)
    qmodel = quantize(tiny, spec, calib=[pixels[:16], pixels[16:]])
    assert is_calibrated(qmodel)
    assert rel_error(qmodel(pixels), tiny(pixels)) < 0.05
    quant = qmodel.conv2.input_quant(torch.relu(qmodel.bn1(qmodel.conv1(pixels))))
    low, high = (-128, 127) if symmetric else (0, 255)
    assert quant.signed == symmetric and low <= quant.int().min() and quant.int().max() <= high


def test_minmax_range_covers_the_batch(tiny, pixels):
    qmodel = quantize(tiny, QuantSpec(act_calibration="minmax", first_layer_bits=None), calib=[pixels])
    quant = qmodel.conv1.input_quant(pixels)  # TinyNet's first layer sees the pixels themselves
    assert torch.allclose(quant.scale, pixels.max() / 255)  # the range [min(x, 0), max(x)] = [0, max]
    assert torch.allclose(quant.value, pixels, atol=quant.scale.item() / 2 + 1e-6)  # nothing clipped


def test_ranges_stay_fixed_while_training(tiny, pixels):
    labels = torch.randint(0, 4, (len(pixels),), generator=torch.Generator().manual_seed(1))
    qmodel = quantize(tiny, "w4a4", calib=[pixels])
    qmodel(pixels)  # the MSE weight ranges are searched at the first quantized forward
    ranges = [p.detach().clone() for p in quantizer_parameters(qmodel)]
    act_scales = [m.input_quant.scale().detach().clone() for _, m in quantized_layers(qmodel)]
    weight = tiny.conv2.weight.detach().clone()
    qmodel.train()
    optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-2)  # everything the model holds
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(qmodel(pixels * 0.5), labels).backward()  # other data than the calibration's
        optimizer.step()
    assert not torch.equal(weight, tiny.conv2.weight)
    assert all(torch.equal(a, b) for a, b in zip(ranges, quantizer_parameters(qmodel)))
    qmodel.eval()
    assert all(torch.equal(s, m.input_quant.scale()) for s, (_, m) in zip(act_scales, quantized_layers(qmodel)))


def test_state_dict_round_trip_keeps_ranges_fixed_and_frozen(tiny, pixels):
    saved = quantize(tiny, "w4a4", calib=[pixels])
    out = saved(pixels)  # also runs the MSE weight-range search, so its result is in the state_dict
    target = quantize(type(tiny)(), "w4a4")
    target.load_state_dict(saved.state_dict())
    assert is_calibrated(target)
    assert not any(p.requires_grad for p in quantizer_parameters(target))
    assert torch.equal(target(pixels), out)


def test_recalibration_starts_afresh(tiny, pixels):
    other = pixels * 0.5
    twice = quantize(tiny, "w8a8", calib=[pixels])
    calibrate(twice, [other])
    once = quantize(tiny, "w8a8", calib=[other])
    assert torch.equal(twice(pixels), once(pixels))


def test_batches_max_batches_and_pairs(tiny, pixels):
    labels = torch.zeros(16, dtype=torch.long)
    pairs = quantize(tiny, "w8a8")
    calibrate(pairs, [(pixels[:16], labels), (pixels[16:], labels)], max_batches=1)
    first = quantize(tiny, "w8a8", calib=[pixels[:16]])
    assert torch.equal(pairs(pixels), first(pixels))


@pytest.mark.parametrize("symmetric", [False, True])
def test_widen_ranges_widens_all_but_the_image(tiny, pixels, symmetric):
    """Both ends of every range but the image's move by the factor (the zero point stays the same integer), so
    an activation past the clean range is no longer clipped; the image's grid is untouched."""
    spec = QuantSpec(act_calibration="minmax", act_symmetric=symmetric, first_layer_bits=None)
    qmodel = quantize(tiny, spec, calib=[pixels])
    past = 1.8 * torch.relu(qmodel.bn1(qmodel.conv1(pixels)))  # conv2's input, past its calibrated range
    image, before = qmodel.conv1.input_quant(pixels), qmodel.conv2.input_quant(past)
    assert before.value.max() < 0.6 * past.max()  # clipped
    assert widen_ranges(qmodel, 2.0) == 2  # conv2's and fc's inputs
    after = qmodel.conv2.input_quant(past)
    assert torch.equal(qmodel.conv1.input_quant(pixels).value, image.value)  # the image
    assert torch.allclose(after.scale, 2 * before.scale) and torch.equal(after.zero_point, before.zero_point)
    assert torch.allclose(after.value, past, atol=after.scale.item() / 2 + 1e-6)  # nothing clipped
    with pytest.raises(InputError, match="factor"):
        widen_ranges(qmodel, 0.5)


def test_float_view_collects_nothing(tiny, pixels):
    qmodel = quantize(tiny, "w8a8")
    qmodel.train()
    with float_view(qmodel):
        qmodel(pixels)
    assert not is_calibrated(qmodel)
    assert all(m.counter == 0 for m in qmodel.modules() if hasattr(m, "counter"))


def test_bad_batches_raise(tiny, pixels):
    qmodel = quantize(tiny, "w8a8")
    with pytest.raises(InputError, match="no batches"):
        calibrate(qmodel, [])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        calibrate(qmodel, [pixels * 255])
    with pytest.raises(InputError, match="float image"):
        calibrate(qmodel, [(pixels * 255).to(torch.uint8)])
    with pytest.raises(InputError, match="max_batches"):
        calibrate(qmodel, [pixels], max_batches=0)
    assert not is_calibrated(qmodel)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        calibrate(qmodel, [pixels, pixels * 255])  # fails midway: no half-calibrated ranges are kept
    assert not is_calibrated(qmodel)


@pytest.mark.parametrize("values", ["relu", "few_values", "normal", "negative"])
def test_kth_smallest_is_kthvalue_exactly(values):
    g = torch.Generator().manual_seed(0)
    x = {"relu": lambda: torch.randn(600_000, generator=g).relu(),  # ties at zero: the low tail's answer
         "few_values": lambda: torch.randint(0, 7, (600_000,), generator=g).float(),
         "normal": lambda: torch.randn(300_000, generator=g),
         "negative": lambda: -torch.randn(400_000, generator=g).relu()}[values]()
    n = x.numel()
    for k in (1, 2, int(n * 1e-5) + 1, n // 2, n - int(n * 1e-5), n - 1, n):
        assert torch.equal(kth_smallest(x, k), torch.kthvalue(x, k)[0]), k


def test_percentile_statistics_are_brevitas_own():
    from brevitas.core.stats import AbsPercentile, NegativePercentileOrZero, PercentileInterval

    from qcbdefense.quant.calibrate import (AbsPercentileStats, NegativePercentileOrZeroStats,
                                           PercentileIntervalStats)
    x = torch.randn(4, 16, 100, 100, generator=torch.Generator().manual_seed(1)) - 0.5
    pairs = [(PercentileInterval(0.001, 99.999), PercentileIntervalStats(0.001, 99.999)),
             (NegativePercentileOrZero(0.001), NegativePercentileOrZeroStats(0.001)),
             (AbsPercentile(99.999, None), AbsPercentileStats(99.999, None))]
    for theirs, ours in pairs:
        assert torch.equal(ours(x), theirs(x)), type(theirs).__name__
