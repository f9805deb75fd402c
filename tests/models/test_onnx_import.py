"""FP ONNX files as models: converted into real torch modules that compute what onnxruntime computes, quantize
and purify like any model, reload from a purified folder; operators we cannot convert are refused by name."""

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.onnx import export_float_onnx
from export.ort import OrtModel
from models.onnx_import import import_onnx
from models.reference import build_model
from qcbdefense.defenses import load_purified, purify, save_purified
from qcbdefense.errors import InputError
from qcbdefense.quant import quantize

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """Every block the converter must map: depthwise conv, squeeze-excitation with Hardsigmoid, SiLU,
    Hardswish, LeakyReLU, GELU (exported as Erf arithmetic), a residual add, adaptive pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1),
                                     nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.GELU(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(x)
        y = y * self.squeeze(y)
        return self.head(self.project(y) + x)


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_exported_blocks_become_torch_modules_that_match_onnxruntime(tmp_path):
    source = _randomised(Blocks())
    path = export_float_onnx(source, tmp_path / "blocks.onnx", input_size=(16, 16))
    model = import_onnx(path)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.Linear, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU} <= kinds
    assert any(m.groups == 8 for m in model.modules() if isinstance(m, nn.Conv2d))
    x = torch.rand(5, 3, 16, 16)
    expected = OrtModel(path, threads=1).logits(x)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(model(x).numpy(), source(x).numpy(), atol=1e-4, rtol=1e-4)
    fx.symbolic_trace(model)  # the reconstruction re-traces it


def _graph_file(path, ops: list[str]) -> str:
    """conv -> (BatchNormalization) -> ops... -> global pool -> flatten -> gemm, written with onnx.helper."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "var"),
             numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "fc"),
             numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["t0"])]
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [f"t{i}"], [f"t{i + 1}"]))
    nodes += [helper.make_node("GlobalAveragePool", [f"t{len(ops)}"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def test_batchnorm_nodes_stay_batchnorm_modules(tmp_path):
    model = import_onnx(_graph_file(tmp_path / "bn.onnx", ["Relu"]))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1


def test_an_operator_we_cannot_convert_is_refused_by_name(tmp_path):
    path = _graph_file(tmp_path / "cos.onnx", ["Cos"])
    with pytest.raises(InputError, match="cannot be converted into torch modules: Cos"):
        import_onnx(path)


def test_a_quantized_file_is_refused_as_a_model(tmp_path):
    model = onnx.load(_graph_file(tmp_path / "fp.onnx", []))
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "fc_b"], ["unused"]))
    onnx.save(model, str(tmp_path / "q.onnx"))
    with pytest.raises(InputError, match="is quantized"):
        import_onnx(tmp_path / "q.onnx")


def test_onnx_round_trip_quantizes_purifies_and_reloads(tmp_path, shapes16):
    """The FP ONNX file of a zoo model -> torch modules -> LAC under w4a4 -> saved -> reloaded from the folder
    alone (the folder records the file as the model reference): the same outputs."""
    source = build_model("small_cnn", mean=shapes16.mean, std=shapes16.std)
    path = export_float_onnx(source, tmp_path / "fp.onnx", input_size=(16, 16))
    model = build_model(str(path))
    assert quantize(model, "w8a8") is not None
    purified, report = purify(model, shapes16, method="lac", spec="w4a4", calib=32, steps=4, check_every=2,
                              evaluate_models=False)
    assert all(layer["mismatches"] == 0 for layer in report.layers) and len(report.layers) == 6
    save_purified(purified, tmp_path / "purified", report=report)
    again = load_purified(None, tmp_path / "purified")
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), purified.cpu()(x))


def test_onnx_expecting_normalised_input_takes_mean_and_std(tmp_path):
    net = _randomised(Blocks())
    path = export_float_onnx(net, tmp_path / "normalised.onnx", input_size=(16, 16))
    model = build_model(str(path), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.25), atol=1e-4, rtol=1e-4)
