"""The differentiable torch replica of an ONNX file computes what onnxruntime computes, with gradients."""

import onnx
import pytest
import torch

from export.onnx import export_float_onnx, export_onnx
from export.ort import OrtModel
from export.replica import OnnxReplica
from export.throughput import cpu_int8_features
from qcbdefense.data import to_float
from qcbdefense.errors import InputError


@pytest.mark.parametrize("kind", ["fp", "w8a8", "w4a4"])
def test_replica_matches_onnxruntime(kind, trained, nearest_w8a8, nearest_w4a4, tmp_path):
    path = tmp_path / f"{kind}.onnx"
    if kind == "fp":
        export_float_onnx(trained.model, path)
    else:
        export_onnx({"w8a8": nearest_w8a8, "w4a4": nearest_w4a4}[kind], path)
    x = to_float(trained.data.test_x[:200])
    expected = torch.from_numpy(OrtModel(path).logits(x))
    replica = OnnxReplica(path)
    with torch.no_grad():
        got = replica(x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.995
    if kind == "fp" or cpu_int8_features()["vnni"]:
        # Without VNNI onnxruntime's u8s8 kernels can saturate int16 pair sums on the 8-bit first layer (the replica
        # is exact): logits then differ by a few percent while the predictions agree (../shared/docs/TOOLCHAIN.md)
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert [layer.op for layer in replica.layers] == ["Conv"] * 5 + ["Gemm"]  # small_cnn: paired with FP

    xg = x[:4].clone().requires_grad_()
    replica(xg)[:, 0].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_replica_refuses_unknown_operators(trained, tmp_path):
    path = tmp_path / "fp.onnx"
    export_float_onnx(trained.model, path)
    proto = onnx.load(str(path))
    next(n for n in proto.graph.node if n.op_type == "Relu").op_type = "Selu"
    onnx.save(proto, str(tmp_path / "selu.onnx"))
    with pytest.raises(InputError, match="Selu"):
        OnnxReplica(tmp_path / "selu.onnx")
