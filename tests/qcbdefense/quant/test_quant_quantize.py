"""quantize: a Brevitas copy that shares the float weights, works on the whole zoo and on a user's own net."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantLinear
from torch import nn

from models import create_model, list_models
from qcbdefense.errors import InputError
from qcbdefense.quant import (SPECS, calibrate, float_view, get_spec, integer_weights, is_calibrated, quantize,
                              quantized_layers, quantizer_parameters, refresh_weight_ranges)


def _proxies_enabled(qmodel: nn.Module) -> bool:
    """Every quantizer on (a layer reading an added quantizer has no input quantizer of its own)."""
    spec = qmodel.qcb_spec
    layers = [m for _, m in quantized_layers(qmodel)]
    added = [qmodel.get_submodule(name) for name in qmodel.qcb_add_quants]
    if added and not spec.quantize_adds:
        return False
    return all(m.weight_quant.is_quant_enabled for m in layers) \
        and all(m.input_quant.is_quant_enabled or spec.act_bits is None or spec.quantize_adds for m in layers) \
        and all(m.act_quant.is_quant_enabled for m in added)


def test_shares_parameters_and_buffers(tiny):
    qmodel = quantize(tiny, "w4a4")
    assert qmodel.conv1.weight is tiny.conv1.weight and qmodel.conv2.bias is tiny.conv2.bias
    assert qmodel.fc.weight is tiny.fc.weight and qmodel.fc.bias is tiny.fc.bias
    assert qmodel.bn1.running_mean is tiny.bn1.running_mean and qmodel.bn1.weight is tiny.bn1.weight
    assert isinstance(qmodel.conv1, QuantConv2d) and isinstance(qmodel.fc, QuantLinear)
    assert type(tiny.conv1) is nn.Conv2d and type(tiny.fc) is nn.Linear  # the float model is untouched
    float_ids = {id(p) for p in tiny.parameters()}
    assert {id(p) for p in quantizer_parameters(qmodel)}.isdisjoint(float_ids)
    assert {id(p) for p in qmodel.parameters()} - {id(p) for p in quantizer_parameters(qmodel)} == float_ids
    assert qmodel.qcb_spec == get_spec("w4a4") and not qmodel.training


@pytest.mark.parametrize("preset", SPECS.names())
def test_float_view_is_bit_exact_and_restored(preset, tiny, pixels):
    ref = tiny(pixels)
    qmodel = quantize(tiny, preset)
    calibrate(qmodel, [pixels])
    with float_view(qmodel):
        assert torch.equal(qmodel(pixels), ref)
    assert _proxies_enabled(qmodel)
    assert not torch.equal(qmodel(pixels), ref)
    with pytest.raises(ZeroDivisionError):
        with float_view(qmodel):
            1 / 0
    assert _proxies_enabled(qmodel)
    with float_view(qmodel):  # and it still works after an exception
        assert torch.equal(qmodel(pixels), ref)


@pytest.mark.parametrize("arch", list_models())
def test_zoo(arch):
    """Every zoo model under every preset: float view bit-exact and restored after. Then, under Qu-ANTI-zation's
    quantizer (abs-max weights: no range search, so cheap): the quantized output differs, the layer order starts
    at a conv and ends at the classifier, and BN folds completely."""
    torch.manual_seed(0)
    model = create_model(arch).eval()
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    for preset in SPECS.names():
        qmodel = quantize(model, preset)
        with float_view(qmodel):
            assert torch.equal(qmodel(x), ref), preset
        assert _proxies_enabled(qmodel), preset
    qmodel = quantize(model, "quanti-w4a4")
    assert not torch.equal(qmodel(x), ref)  # uncalibrated is fine here: any quantized output differs
    layers = quantized_layers(qmodel)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(n for n, _ in layers) == sorted(convs)
    assert isinstance(layers[0][1], QuantConv2d) and isinstance(layers[-1][1], QuantLinear)
    folded = quantize(model, get_spec("quanti-w4a4").replace(fold_bn=True))
    assert folded.qcb_unfolded_bn == ()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with float_view(folded):
        assert torch.allclose(folded(x), ref, rtol=1e-4, atol=1e-4)


def test_training_through_updates_the_float_model(tiny, pixels):
    labels = torch.randint(0, 4, (len(pixels),), generator=torch.Generator().manual_seed(1))
    qmodel = quantize(tiny, "w4a4")
    calibrate(qmodel, [pixels])
    before = {name: p.detach().clone() for name, p in tiny.named_parameters()}
    ref = tiny(pixels).detach()
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.5)
    optimizer.zero_grad()
    F.cross_entropy(qmodel(pixels), labels).backward()
    optimizer.step()
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert not torch.equal(before[name], dict(tiny.named_parameters())[name]), name
    tiny.eval()
    assert not torch.allclose(tiny(pixels), ref)
    with float_view(qmodel.eval()):
        assert torch.equal(qmodel(pixels), tiny(pixels))


def test_user_residual_net(user_resnet, pixels, rel_error):
    ref = user_resnet(pixels)
    errors = {}
    for preset in ("w8a8", "w4a4"):
        qmodel = quantize(user_resnet, preset, calib=[pixels[:16], pixels[16:]], example_input=pixels[:1])
        out = qmodel(pixels)
        errors[preset] = rel_error(out, ref)
        with float_view(qmodel):
            assert torch.equal(qmodel(pixels), ref)
    assert errors["w8a8"] < 0.03, errors
    assert errors["w8a8"] * 3 < errors["w4a4"] < 0.5, errors
    names = [name for name, _ in quantized_layers(qmodel)]
    assert names == ["stem", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2",
                     "block2.shortcut.0", "head"]
    bits = {name: w.bits for name, w in integer_weights(qmodel).items()}
    assert bits == {"stem": 8, "block1.conv1": 4, "block1.conv2": 4, "block2.conv1": 4, "block2.conv2": 4,
                    "block2.shortcut.0": 4, "head": 8}
    assert qmodel.stem.input_quant.bit_width() == 8 and qmodel.head.input_quant.bit_width() == 4


def test_fold_bn_is_a_deployment_copy(user_resnet, pixels, rel_error):
    spec = get_spec("w8a8").replace(fold_bn=True)
    folded = quantize(user_resnet, spec, calib=[pixels], example_input=pixels[:1])
    assert folded.stem.weight is not user_resnet.stem.weight
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel_error(folded(pixels), user_resnet(pixels)) < 0.03
    assert [n for n, _ in quantized_layers(folded)][-1] == "head"


def test_quantize_adds_quantizes_each_residual_tensor_once(user_resnet, pixels, rel_error):
    """Under w8a8-deploy both inputs and the (post-ReLU) output of every add come from an added quantizer,
    a layer reading one has no input quantizer of its own, and the parameters are still shared."""
    qmodel = quantize(user_resnet, "w8a8-deploy", calib=[pixels], example_input=pixels[:1])
    assert qmodel.stem.weight is user_resnet.stem.weight and is_calibrated(qmodel)
    with float_view(qmodel):
        assert torch.equal(qmodel(pixels), user_resnet(pixels))
    assert rel_error(qmodel(pixels), user_resnet(pixels)) < 0.05
    added = set(qmodel.qcb_add_quants)
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 2
    for add in adds:
        assert all(arg.op == "call_module" and arg.target in added for arg in add.args), add.args
        (relu,) = add.users
        assert [user.target for user in relu.users][0] in added
    assert len(added) == 6  # stem output (block1 input), and per block: conv2 side, shortcut side if any, output
    enabled = {name for name, layer in quantized_layers(qmodel) if layer.input_quant.is_quant_enabled}
    assert enabled == {"stem", "block1.conv2", "block2.conv2", "head"}  # the others read an added quantizer


def test_weight_only_has_no_input_quantizers(tiny, pixels):
    qmodel = quantize(tiny, get_spec("quanti-w4a4").replace(act_bits=None))
    assert all(not m.input_quant.is_quant_enabled for _, m in quantized_layers(qmodel))
    assert calibrate(qmodel, [pixels]) is qmodel


def test_refresh_weight_ranges_matches_a_fresh_quantize(tiny):
    qmodel = quantize(tiny, "w4a4")
    integer_weights(qmodel)  # the MSE search runs at the first quantized forward
    with torch.no_grad():
        tiny.conv2.weight.mul_(3.0)
    stale = integer_weights(qmodel)["conv2"]
    fresh = integer_weights(quantize(tiny, "w4a4"))["conv2"]
    assert not torch.equal(stale.scale, fresh.scale)
    refreshed = integer_weights(refresh_weight_ranges(qmodel))["conv2"]
    assert torch.equal(refreshed.scale, fresh.scale) and torch.equal(refreshed.int_weight, fresh.int_weight)


def test_absmax_ranges_follow_the_weights(tiny):
    qmodel = quantize(tiny, "quanti-w8a8")
    before = integer_weights(qmodel)["conv2"].scale
    with torch.no_grad():
        tiny.conv2.weight.mul_(2.0)
    assert torch.allclose(integer_weights(qmodel)["conv2"].scale, 2 * before)


class _Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_refuses_what_it_cannot_quantize(tiny):
    with pytest.raises(InputError, match="already quantized"):
        quantize(quantize(tiny, "w8a8"), "w8a8")
    with pytest.raises(InputError, match="Conv1d"):
        quantize(_Conv1dNet(), "w8a8")
    with pytest.raises(InputError, match="no nn.Conv2d or nn.Linear"):
        quantize(nn.Sequential(nn.ReLU()), "w8a8")
    with pytest.raises(InputError, match="example_input"):
        quantize(tiny, "w8a8", example_input=torch.zeros(1, 5, 8, 8))
    with pytest.raises(InputError, match="unknown quant spec"):
        quantize(tiny, "w9a9")
