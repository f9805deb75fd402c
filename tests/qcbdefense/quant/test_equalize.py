"""Activation equalization: the float function stays, the channel that dwarfs its tensor shrinks, and only
channels whose every writer and reader can absorb a scale move."""

import pytest
import torch
from torch import nn

from models import create_model
from qcbdefense.errors import InputError
from qcbdefense.quant.equalize import equalize_activations


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    with torch.no_grad():  # BN statistics a trained model would have, so that every channel carries something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.5)
    return model


def _input_max(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"].abs().transpose(0, 1).flatten(1).amax(1)


def test_a_grown_channel_inside_a_block_is_scaled_back_with_the_function_unchanged():
    model, x = _resnet20(), torch.rand(16, 3, 32, 32)
    block = model.layer1[1]
    with torch.no_grad():  # channel 5 of the block's inner tensor 30x as wide, the block's function unchanged
        block.bn1.weight[5] *= 30
        block.bn1.bias[5] *= 30
        block.conv2.weight[:, 5] /= 30
        before = model(x)
    grown = _input_max(model, block.conv2, x)
    assert grown[5] > 10 * grown.median()
    scales = equalize_activations(model, x, ratio=2.0)
    after = _input_max(model, block.conv2, x)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-4)
    assert scales["layer1.1.bn1"][5] > 5
    assert after.max() <= 2.0 * after[after > 0].median() * 1.001
    assert after.max() < grown.max() / 5


def test_a_residual_stream_channel_is_scaled_at_every_writer_and_reader_through_the_padded_shortcuts():
    """Stream channel 2 of the first stage is written by the stem's BN and every first-stage block, carried by
    option-A shortcuts to channel 10 of the second stage and 26 of the third, and read by the classifier."""
    model, x = _resnet20(), torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        model.bn1.weight[2] *= 40
        model.bn1.bias[2] = 3.0
        before = model(x)
    scales = equalize_activations(model, x, ratio=2.0)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-4)
    s = scales["bn1"][2]
    assert s > 3
    for name, channel in [("layer1.0.bn2", 2), ("layer1.2.bn2", 2), ("layer2.0.bn2", 10), ("layer3.2.bn2", 26)]:
        assert scales[name][channel] == pytest.approx(s)
    assert "layer1.0.bn1" not in scales or scales["layer1.0.bn1"][2] != pytest.approx(s)


def test_the_logits_and_tensors_normalisation_reads_are_left_alone():
    """A linear classifier's outputs are the logits; a conv followed by BN writes nothing a scale could pass."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight[3] *= 50  # huge before BN: BN's input, not a scalable channel
        model[5].weight[1] *= 50  # a huge logit
    x = torch.rand(8, 3, 12, 12)
    scales = equalize_activations(model, x)
    assert "0" not in scales and "5" not in scales


def test_a_flatten_that_folds_space_into_features_ties_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] *= 40
        model[0].bias[1] = 5.0
    scales = equalize_activations(model, torch.rand(4, 3, 12, 12))
    assert scales == {}


def test_an_untraceable_model_is_refused_in_one_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(InputError, match="torch.fx"):
        equalize_activations(Branchy(), torch.rand(2, 3, 4, 4))


def test_torchvision_resnet18_with_its_shared_relu_and_projection_shortcuts_keeps_its_function():
    """torchvision's blocks call one ReLU module twice and project the shortcut with a conv and BN: a grown
    stream channel is still scaled at the stem, every block and the classifier, the logits unchanged."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.5)
        model.bn1.weight[7] *= 40
        model.bn1.bias[7] = 3.0
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    scales = equalize_activations(model, x)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-4)
    assert scales["bn1"][7] > 2
    assert scales["layer1.1.bn2"][7] == pytest.approx(scales["bn1"][7])
    assert "layer2.0.downsample.1" not in scales or scales["layer2.0.downsample.1"][7] == 1.0


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "vgg16_bn", "mobilenetv2"])
def test_every_zoo_model_computes_the_same_function_after_equalizing(name):
    """Equalizing hard (every channel past 1.5x its tensor's median) leaves each zoo model's logits as they were,
    whatever its graph (ReLU6 and depthwise convs in MobileNetV2, projection shortcuts in ResNet-18)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 3.0)
                m.bias.uniform_(-0.2, 0.5)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    scales = equalize_activations(model, x, ratio=1.5)
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(after, before, rtol=1e-3, atol=1e-4 * before.abs().max().item())
    assert scales  # something was scaled: the test exercised the walk


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_purify_equalizes_on_demand_or_where_the_quantized_model_agrees_better(mode, tiny_builtin):
    """"on" always keeps the equalized model; "auto" measures both quantized candidates' agreement with the FP
    model on the calibration images and keeps the better; either way the report says what happened."""
    from qcbdefense.defenses import purify

    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] *= 60  # one channel 60x its block's others
        model.layer1[0].bn1.bias[3] = 2.0
    _, report = purify(model, tiny_builtin, method="nearest", spec="w8a8", calib=64, equalize=mode,
                       evaluate_models=False)
    assert report.equalize["mode"] == mode
    if mode == "on":
        assert "calib_agreement" not in report.equalize and report.equalized["layer1.0.bn1"][3] > 4
    else:
        agreement = report.equalize["calib_agreement"]
        assert bool(report.equalized) == (agreement["equalized"] > agreement["plain"])
    with pytest.raises(InputError, match="equalize takes one of"):
        purify(model, tiny_builtin, method="nearest", spec="w8a8", calib=64, equalize=True, evaluate_models=False)
