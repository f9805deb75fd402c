"""Model references beyond the zoo (torchvision:NAME, PACKAGE.MODULE:CALLABLE, timm:NAME): built with the
data's class count behind Normalize, reloaded from checkpoints and purified folders, and every bad reference
refused in one line with exit 2."""

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from models import create_model
from models.normalize import Normalized
from models.reference import build_model, check_reference
from qcbdefense.checkpoints import load_model, save_model
from qcbdefense.cli import main
from qcbdefense.defenses import load_purified, purify, save_purified
from qcbdefense.errors import InputError
from qcbdefense.quant import quantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module `user_nets` with a good factory and two bad ones."""
    (tmp_path / "user_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))

        def not_a_module(num_classes):
            return "a string"

        class Untraceable(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.conv, self.linear = nn.Conv2d(3, 4, 3), nn.Linear(4, num_classes)

            def forward(self, x):
                x = self.conv(x)
                if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                    x = x.relu()
                return self.linear(x.mean((2, 3)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_nets"
    sys.modules.pop("user_nets", None)


def test_torchvision_model_takes_pixels_and_the_class_count():
    model = build_model("torchvision:mobilenet_v3_small", num_classes=7, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert isinstance(model, Normalized) and model.qcb_model_ref == "torchvision:mobilenet_v3_small"
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_builder_arguments_reach_the_builder_and_stay_in_the_reference(tmp_path):
    ref = "torchvision:efficientnet_b0(stochastic_depth_prob=0.0, dropout=0.0)"
    model = build_model(ref)
    assert model.qcb_model_ref == ref and model.net.classifier[0].p == 0.0
    assert {m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"} == {0.0}
    assert {m.p for m in build_model("torchvision:efficientnet_b0").modules()
            if type(m).__name__ == "StochasticDepth"} != {0.0}
    save_model(model, tmp_path / "w.pt")
    assert load_model(ref, tmp_path / "w.pt").net.classifier[0].p == 0.0


@pytest.mark.parametrize("reference, fragment", [
    ("torchvision:resnet18(no_such_option=1)", "unexpected keyword argument 'no_such_option'"),
    ("torchvision:resnet18(True)", "builder arguments are KEY=VALUE pairs only"),
    ("torchvision:resnet18(x=__import__('os'))", "x must be a literal"),
    ("torchvision:resnet18(x=", "cannot read its builder arguments"),
    ("torchvision:resnet18(num_classes=3)", "the class count comes from the data"),
    ("resnet20(zero_init=True)", "builder arguments apply to torchvision:, timm: and PACKAGE.MODULE:CALLABLE"),
])
def test_bad_builder_arguments_are_one_line(reference, fragment):
    with pytest.raises(InputError, match=None) as err:
        build_model(reference)
    assert fragment in str(err.value) and len(str(err.value).splitlines()) == 1, err.value


def test_a_plain_torchvision_checkpoint_loads_behind_normalize(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    save_model(net, tmp_path / "plain.pt")  # keys without the net. prefix, no normalize buffers
    model = load_model("torchvision:resnet18", tmp_path / "plain.pt")
    assert torch.equal(model.net.fc.weight, net.fc.weight) and model.net.fc.out_features == 3


def test_user_callable_builds_quantizes_and_reloads_from_its_purified_folder(user_module, tmp_path):
    model = build_model(f"{user_module}:tiny", num_classes=4)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    qmodel = quantize(model, "w8a8", calib=[torch.rand(8, 3, 16, 16)], example_input=torch.rand(1, 3, 16, 16))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = qmodel(x)  # the first quantized forward also searches the MSE weight ranges
    save_purified(qmodel, tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(load_purified(None, tmp_path / "p")(x), expected)


def test_torchvision_model_reloads_from_its_purified_folder(shapes16, tmp_path):
    model = build_model("torchvision:mobilenet_v3_small", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method="nearest", spec="w8a8", calib=16, evaluate_models=False)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = purified.cpu()(x)  # the first quantized forward also searches the MSE weight ranges
    save_purified(purified, tmp_path / "p", report=report)
    assert json.loads((tmp_path / "p" / "model.json").read_text()) == {"model": "torchvision:mobilenet_v3_small"}
    with torch.no_grad():
        assert torch.equal(load_purified(None, tmp_path / "p")(x), expected)


def test_a_model_fx_cannot_trace_is_refused_with_the_remedy(user_module, shapes16):
    model = build_model(f"{user_module}:Untraceable")
    with pytest.raises(InputError, match="torch.fx-traceable.*pass the .onnx file as --model") as err:
        purify(model, shapes16, method="lac", spec="w8a8", calib=8, steps=1, evaluate_models=False)
    assert "\n" not in str(err.value)


def test_a_conv_subclass_is_refused_naming_the_module():
    class Conv2dSame(nn.Conv2d):
        pass

    model = nn.Sequential(Conv2dSame(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(InputError, match="cannot quantize Conv2dSame at '0'"):
        quantize(model, "w8a8")


def test_timm_without_timm_is_one_clear_line(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(InputError, match="needs timm, an optional extra"):
        build_model("timm:resnet18")


def test_timm_model_purifies_and_reloads_from_its_purified_folder(shapes16, tmp_path):
    pytest.importorskip("timm")
    from brevitas.nn import QuantLinear

    model = build_model("timm:mobilenetv3_small_050", mean=shapes16.mean, std=shapes16.std)
    purified, report = purify(model, shapes16, method="lac", spec="w8a8", calib=16, steps=2, evaluate_models=False)
    assert isinstance(purified.net.classifier, QuantLinear)  # timm's Linear: nn.Linear's forward, quantized
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = purified.cpu()(x)
    save_purified(purified, tmp_path / "p", report=report)
    assert json.loads((tmp_path / "p" / "model.json").read_text()) == {"model": "timm:mobilenetv3_small_050"}
    with torch.no_grad():
        assert torch.equal(load_purified(None, tmp_path / "p")(x), expected)


def test_timm_conv_subclasses_are_refused_naming_the_module():
    pytest.importorskip("timm")
    from timm.layers import StdConv2d

    with pytest.raises(InputError, match="cannot quantize Conv2dSame at 'net.conv_stem'") as err:
        quantize(build_model("timm:tf_efficientnet_b0"), "w8a8")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cannot quantize StdConv2d at '0'"):
        quantize(nn.Sequential(StdConv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), "w8a8")


def test_an_unknown_timm_model_is_one_line():
    pytest.importorskip("timm")
    with pytest.raises(InputError, match="unknown timm model 'resnet81'"):
        build_model("timm:resnet81")


@pytest.mark.parametrize("reference, fragment", [
    ("torchvision:resnet81", "unknown torchvision model 'resnet81'; did you mean resnet18"),
    ("{user}:not_a_module", "returned a str, not a torch nn.Module"),
    ("{user}:missing", "has no callable 'missing'"),
    ("no_such_package.nets:build", "cannot import no_such_package.nets"),
])
def test_bad_model_references_are_one_line_and_exit_2(reference, fragment, user_module, tmp_path, capsys):
    ckpt = tmp_path / "w.pt"
    save_model({"x": torch.zeros(1)}, ckpt)
    code = main(["quantize", "--model", reference.format(user=user_module), "--ckpt", str(ckpt),
                 "--data", "builtin"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_an_onnx_file_with_an_operator_we_cannot_convert_exits_2(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cos", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    onnx.save(helper.make_model(graph), str(tmp_path / "cos.onnx"))
    code = main(["purify", "--model", str(tmp_path / "cos.onnx"), "--data", "builtin", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be converted into torch modules: Cos" in err
    assert not (tmp_path / "o").exists()


def test_a_reference_of_no_known_form_is_refused_at_parse_time(capsys):
    with pytest.raises(InputError, match="unknown model 'resnet-18'; give a zoo name, torchvision:NAME"):
        check_reference("resnet-18")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", "resnet-18", "--data", "builtin"])
    assert exc.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_zoo_model_still_needs_its_checkpoint(capsys):
    code = main(["quantize", "--model", "small_cnn", "--data", "builtin"])
    assert code == 2 and "--ckpt is needed" in capsys.readouterr().err


def test_attack_takes_an_onnx_model_without_init_and_a_zoo_model_only_with_it(tmp_path, capsys, monkeypatch):
    from export.onnx import export_float_onnx

    code = main(["attack", "--method", "quanti", "--model", "small_cnn", "--data", "builtin",
                 "--out", str(tmp_path / "a")])
    assert code == 2 and "--init is needed" in capsys.readouterr().err
    fp = export_float_onnx(create_model("small_cnn").eval(), tmp_path / "fp.onnx")

    class ReachedTheData(Exception):
        pass

    def stop(*args, **kwargs):
        raise ReachedTheData

    monkeypatch.setattr("qcbdefense.data.load_dataset", stop)
    with pytest.raises(ReachedTheData):  # the ONNX file's own weights were loaded; the run went on to the data
        main(["attack", "--method", "quanti", "--model", str(fp), "--data", "builtin", "--out", str(tmp_path / "b")])


def test_cli_trains_a_user_model_and_quantizes_its_checkpoint(user_module, tmp_path, capsys):
    reference = f"{user_module}:tiny"
    assert main(["train", "--model", reference, "--data", "builtin", "--epochs", "1", "--train-subset", "64",
                 "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["model"] == reference
    assert main(["quantize", "--model", reference, "--ckpt", str(tmp_path / "run" / "model.pt"), "--data", "builtin",
                 "--spec", "w8a8", "--calib", "32", "--out", str(tmp_path / "ptq.json")]) == 0
    assert json.loads((tmp_path / "ptq.json").read_text())["model"] == reference
