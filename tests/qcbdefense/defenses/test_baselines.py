"""The paper baselines on the built-in shapes: the FP-model defences (FT, fine-pruning, NAD, I-BAU, FT-SAM) train
the FP model on the labelled share and hand it to the victim's round-to-nearest quantization; the
robust-quantization baselines (OMSE, ACIQ) change quantizer ranges and nothing else. Their pieces (pruning
order, attention stages, ACIQ's clipping, the perturbation ball) against hand-worked examples."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import create_model
from qcbdefense.defenses import DEFENSES, purify
from qcbdefense.defenses.aciq import laplace_clip_ratio, lambert_w
from qcbdefense.defenses.clipping import set_act_range_
from qcbdefense.defenses.fine_pruning import pruning_order
from qcbdefense.defenses.ibau import IBauOptions, universal_perturbation
from qcbdefense.defenses.nad import attention, attention_stages
from qcbdefense.errors import InputError
from qcbdefense.quant import calibrate, integer_weights, is_calibrated, quantize
from qcbdefense.quant.ptq import post_training_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

FP_DEFENCES = {"ft": {}, "fine-pruning": {}, "nad": {"teacher_epochs": 1}, "i-bau": {"inner_steps": 2},
               "ft-sam": {}}


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights, biases and BN state: everything but the quantizers' own state."""
    return {k: v for k, v in module.state_dict().items() if "_quant." not in k}


@pytest.mark.parametrize("method", sorted(FP_DEFENCES))
def test_fp_defences_train_the_fp_model_then_quantize_it_by_nearest(method, shapes16):
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    before = copy.deepcopy(model.state_dict())
    purified, report = purify(model, shapes16, method=method, spec="w4a4", calib=32, evaluate_models=False,
                              epochs=1, **FP_DEFENCES[method])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model changed"
    defended = _float_state(purified)
    changed = [k for k, v in defended.items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert changed, "no FP weight moved"
    assert report.data_used == {"unlabeled_train_images": 32, "labelled_train_images": 150,
                                "labelled_fraction": 0.05}  # 5 % of the 3,000 training images
    # what the victim gets: the defended FP model quantized by round-to-nearest on the same clean images
    fp = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    fp.load_state_dict(defended)
    victim = post_training_quantize(fp, "w4a4", shapes16, calib=32, seed=0)
    assert is_calibrated(purified)
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(purified(images), victim(images))
    if method == "fine-pruning":
        pruned = report.layers[0]["pruned_channels"]
        assert pruned > 0 and int((defended["linear.weight"] == 0).all(0).sum()) == pruned


@pytest.mark.parametrize("method", ["omse", "aciq"])
def test_range_baselines_change_only_the_quantizer_ranges(method, shapes16):
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method=method, spec="w4a4", calib=64, evaluate_models=False)
    nearest = post_training_quantize(copy.deepcopy(model), "w4a4", shapes16, calib=64, seed=0)
    nearest(torch.rand(1, 3, 16, 16))  # the MSE weight ranges are searched at the first quantized forward
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in _float_state(purified).items())
    moved = {k for k, v in purified.state_dict().items() if "_quant." in k
             and not torch.allclose(v, nearest.state_dict()[k])}
    assert any("input_quant" in k for k in moved), "no activation range changed"
    # ACIQ clips the weights too; OMSE keeps the spec's MSE weight ranges (they are already OMSE's)
    assert any("weight_quant" in k for k in moved) == (method == "aciq")
    assert report.data_used == {"unlabeled_train_images": 64}


def test_range_baselines_leave_abs_max_weight_ranges_and_say_so(shapes16):
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method="aciq", spec="pqbackdoor-w4a4", calib=64,
                              evaluate_models=False)
    nearest = post_training_quantize(copy.deepcopy(model), "pqbackdoor-w4a4", shapes16, calib=64, seed=0)
    assert all(torch.equal(a.int_weight, b.int_weight)
               for a, b in zip(integer_weights(purified).values(), integer_weights(nearest).values()))
    assert "not replaceable" in report.layers[0]["weight_ranges"]


def test_aciq_clipping_is_the_papers_table_and_lands_in_the_quantizer():
    assert lambert_w(1.0) == pytest.approx(0.567143, abs=1e-6)  # the omega constant
    # Banner et al.'s Laplace clipping values a / b for 2, 3, 4 and 8 bits
    assert [round(laplace_clip_ratio(b), 2) for b in (2, 3, 4, 8)] == [2.83, 3.9, 5.03, 9.9]
    qmodel = quantize(create_model("small_cnn"), "w4a4")
    calibrate(qmodel, [torch.rand(4, 3, 32, 32)])
    layer = qmodel.features[3]  # a 4-bit input: 15 steps
    set_act_range_(layer, torch.tensor(-0.4), torch.tensor(2.6))
    assert layer.input_quant.scale().item() == pytest.approx(0.2)
    assert layer.input_quant.zero_point().item() == 2  # 0.4 / 0.2


def test_fine_pruning_prunes_the_least_active_channels_until_accuracy_falls():
    head = nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.1]))  # with a channel gone its class falls to class 2
    features = torch.tensor([[0.0, 0, 5], [0, 0, 5], [0, 3, 0], [1, 0, 0]])  # channel means 0.25, 0.75, 2.5
    labels = torch.tensor([2, 2, 1, 0])
    order, accuracies = pruning_order(features, head, labels, max_accuracy_drop=25.0)
    assert accuracies == [100.0, 75.0, 50.0, 50.0]
    assert order.tolist() == [0]
    assert pruning_order(features, head, labels, max_accuracy_drop=10.0)[0].tolist() == []
    assert pruning_order(features, head, labels, max_accuracy_drop=50.0)[0].tolist() == [0, 1, 2]


def test_nad_attends_to_each_stage_output():
    assert attention_stages(create_model("small_cnn"), torch.rand(1, 3, 32, 32)) == \
        ["features.5", "features.12", "features.16"]
    assert attention_stages(create_model("resnet20"), torch.rand(1, 3, 32, 32)) == ["layer1", "layer2", "layer3"]
    features = torch.zeros(1, 2, 2, 2)
    features[0, :, 0, 0] = torch.tensor([1.0, -3.0])  # channel mean of squares: 5 at (0, 0), 0 elsewhere
    features[0, 0, 1, 1] = 2.0                         # 2 at (1, 1)
    expected = torch.tensor([[5.0, 0.0, 0.0, 2.0]]) / 29 ** 0.5
    assert torch.allclose(attention(features, 2.0), expected)


def test_ibau_perturbation_stays_in_its_ball_and_raises_the_loss(shapes16):
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=shapes16.mean, std=shapes16.std).eval()
    x, y = shapes16.train_x[:32].float() / 255, shapes16.train_y[:32]
    options = IBauOptions(inner_steps=5, radius=1.0)
    delta = universal_perturbation(model, x, y, options)
    assert delta.shape == x.shape[1:] and delta.norm() <= 1.0 + 1e-5
    with torch.no_grad():
        clean = nn.functional.cross_entropy(model(x), y)
        perturbed = nn.functional.cross_entropy(model((x + delta).clamp(0, 1)), y)
    assert perturbed > clean


@pytest.mark.parametrize("option, value", [("lr", "1e-4"), ("lr", 0.0), ("momentum", -0.1), ("weight_decay", None),
                                           ("augment", "yes"), ("epochs", 2.5)])
@pytest.mark.parametrize("method", sorted(FP_DEFENCES))
def test_fp_defences_refuse_a_bad_schedule_as_an_input_error(method, option, value):
    """A bench YAML's `lr: 1e-4` is a string (YAML 1.1 wants a dot): one clear error, not a TypeError."""
    with pytest.raises(InputError, match=option):
        DEFENSES.get(method).make_options({option: value})
