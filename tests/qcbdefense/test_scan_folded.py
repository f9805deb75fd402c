"""The searches' steps run a copy of each model with its BatchNorms folded into the convs; everything the scan
reports comes from the model itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import create_model
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.held_view import held_view
from qcbdefense.quant.quantize import quantize
from qcbdefense.scanner.folded import conv_batchnorm_pairs, fold_batchnorm
from qcbdefense.scanner.tapped import TappedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def resnet() -> nn.Module:
    """A ResNet-20 whose BatchNorms hold statistics of their own (not the identity a fresh one is)."""
    torch.manual_seed(0)
    model = create_model("resnet20").train()
    with torch.no_grad():
        for _ in range(3):
            model(_images(16, 1) * 2)
    return model.eval()


def test_folding_keeps_the_fp_models_function_and_leaves_no_batchnorm(resnet):
    x = _images(32, 2)
    folded = fold_batchnorm(resnet, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())  # the model itself is untouched
    with torch.no_grad():
        assert torch.allclose(folded(x), resnet(x), atol=1e-4)


def test_folding_a_held_range_quantized_model_answers_as_it_does(resnet):
    qmodel = quantize(resnet, "w4a4")
    calibrate(qmodel, [_images(32, 3)])
    view = held_view(qmodel).eval()
    x = _images(64, 4)
    folded = fold_batchnorm(view, x)
    assert folded is not None
    with torch.no_grad():
        assert torch.equal(folded(x).argmax(1), view(x).argmax(1))


class _Reused(nn.Module):
    """A conv whose output feeds its BatchNorm and, through a functional op the hooks cannot see, the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.linear = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.linear(torch.cat([self.bn(y), y], 1).mean((2, 3)))


def test_a_fold_that_changes_the_answers_is_refused():
    torch.manual_seed(0)
    model = _Reused().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)  # folding changes what the second use of the conv's output sees
        model.bn.running_var.fill_(0.01)
    x = _images(64, 5)
    assert conv_batchnorm_pairs(model, x) == [("conv", "bn")]
    assert fold_batchnorm(model, x) is None


def test_only_plain_batchnorms_after_a_conv_called_once_are_paired():
    class ActNorm(nn.BatchNorm2d):  # a BatchNorm that does more (timm's BatchNormAct2d applies its activation)
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ActNorm(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    assert conv_batchnorm_pairs(model, _images(2, 6)) == [("2", "3")]


def test_the_tapped_model_runs_the_folded_copy_only_where_an_input_gradient_is_wanted(resnet):
    x = _images(16, 7)
    tapped = TappedModel(resnet, example=x)
    assert tapped.folded is not None
    ran = []
    tapped.folded.register_forward_hook(lambda *_: ran.append(True))
    with torch.no_grad():
        assert torch.equal(tapped(x), resnet(x)) and not ran
    stamped = x.clone().requires_grad_()
    out = tapped(stamped)
    out.sum().backward()
    assert ran and stamped.grad is not None and torch.allclose(out, resnet(x), atol=1e-4)
