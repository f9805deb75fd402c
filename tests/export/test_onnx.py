"""torch -> ONNX -> onnxruntime round trips: faithful, checked, with metadata, on integer kernels, integers kept."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.onnx import export_float_onnx, export_onnx, metadata_spec, quantize_before_reshapes, read_metadata
from export.ort import OrtModel
from qcbdefense.data import to_float
from qcbdefense.errors import InputError
from qcbdefense.fileio import sha256_file
from qcbdefense.quant.calibrate import calibrate
from qcbdefense.quant.inspect import integer_weights
from qcbdefense.quant.quantize import quantize
from qcbdefense.quant.spec import get_spec
from qcbdefense.scoring import agreement, predict

N_TEST = 1000  # enough for a 99 % agreement bound to mean something, small enough for 2 shared cores


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _weight_integers(path) -> list[np.ndarray]:
    """The integer initializer behind each Conv / Gemm weight, in graph order."""
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producer[node.input[1]]
            source = producer.get(dq.input[0])
            found.append(inits[source.input[0] if source is not None else dq.input[0]])
    return found


@pytest.mark.parametrize("spec", ["w8a8", "w4a4"])
def test_round_trip_agrees_with_brevitas(spec, trained, nearest_w8a8, nearest_w4a4, tmp_path):
    qmodel = nearest_w8a8 if spec == "w8a8" else nearest_w4a4
    source = sha256_file(trained.ckpt)
    path = export_onnx(qmodel, tmp_path / "q.onnx", spec=spec, defense="nearest", source_sha256=source)

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    meta = read_metadata(path)
    assert meta["qcbdefense.kind"] == "quantized" and meta["qcbdefense.defense"] == "nearest"
    assert meta["qcbdefense.source_sha256"] == source
    assert meta["qcbdefense.version"]
    assert metadata_spec(meta) == get_spec(spec) and json.loads(meta["qcbdefense.spec"])["name"] == spec

    x = trained.data.test_x[:N_TEST]
    ort_model = OrtModel(path, threads=1)
    assert ort_model.batch is None, "the batch dimension must be dynamic"
    ours = ort_model.predict(x)
    ref = predict(qmodel, x)
    assert agreement(ours, ref) >= 99.0
    with torch.no_grad():
        logits = qmodel(to_float(x[:64]))
    np.testing.assert_allclose(ort_model.logits(to_float(x[:64])), logits.numpy(), atol=0.05 * logits.abs().max().item())
    assert ort_model.predict(x[:3]).shape == (3,) and ort_model.predict(x[:1]).shape == (1,)


def test_int8_runs_on_integer_kernels(nearest_w8a8, tmp_path):
    """BN folded into the weight scales and int32 biases let ORT fuse QLinearConv / QGemm; without the two
    rewrites nothing fuses (the facts export/onnx.py's docstring reports)."""
    plain = export_onnx(nearest_w8a8, tmp_path / "plain.onnx", fold_bn=False, int_bias=False)
    OrtModel(plain, threads=1, optimized_path=tmp_path / "plain-opt.onnx")
    assert not {"QLinearConv", "ConvInteger", "QGemm"} & set(_ops(tmp_path / "plain-opt.onnx"))

    path = export_onnx(nearest_w8a8, tmp_path / "q.onnx")
    assert "BatchNormalization" not in _ops(path)
    OrtModel(path, threads=1, optimized_path=tmp_path / "q-opt.onnx")
    optimised = _ops(tmp_path / "q-opt.onnx")
    # small_cnn: 4 of its 5 convs feed a quantized layer (the last feeds the global average pool)
    assert optimised["QLinearConv"] + optimised["ConvInteger"] >= 4
    assert optimised["QGemm"] == 1


def test_bn_folding_keeps_the_integers(nearest_w8a8, tmp_path):
    folded = _weight_integers(export_onnx(nearest_w8a8, tmp_path / "folded.onnx"))
    plain = _weight_integers(export_onnx(nearest_w8a8, tmp_path / "plain.onnx", fold_bn=False, int_bias=False))
    expected = [w.int_weight.numpy() for w in integer_weights(nearest_w8a8).values()]
    assert len(folded) == len(plain) == len(expected) == 6
    for ours, before, want in zip(folded, plain, expected):
        assert ours.dtype == before.dtype and np.array_equal(ours, before)
        assert np.array_equal(ours.astype(np.int64), want.astype(np.int64))


def test_bn_folding_and_int_bias_keep_the_function(trained, nearest_w8a8, tmp_path):
    """Same outputs with and without the rewrites (negative gammas included: the fixture has some)."""
    x = to_float(trained.data.test_x[:256])
    plain = OrtModel(export_onnx(nearest_w8a8, tmp_path / "plain.onnx", fold_bn=False, int_bias=False), threads=1)
    folded = OrtModel(export_onnx(nearest_w8a8, tmp_path / "folded.onnx"), threads=1)
    a, b = plain.logits(x), folded.logits(x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_snapped_biases_are_what_the_int32_file_holds(trained, nearest_w8a8):
    """After `snap_biases_to_int32` the PyTorch model's (folded) biases are the file's int32 biases: a second
    rounding moves them by float noise only, where the first moved them by up to half an accumulator step."""
    from export.onnx import _qcdq_proto, fold_batchnorm, inline_constant_identities, quantize_biases
    from export.onnx import snap_biases_to_int32

    def shifts(model) -> dict:
        proto = _qcdq_proto(model, (32, 32), 13)
        inline_constant_identities(proto)
        fold_batchnorm(proto)
        found: dict = {}
        quantize_biases(proto, found)
        return found

    model = nearest_w8a8  # shared by other tests: its parameters are restored below
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = to_float(trained.data.test_x[:64])
    try:
        with torch.no_grad():
            reference = model(x).argmax(1)
        before = shifts(model)
        assert snap_biases_to_int32(model) == len(before) > 0
        assert any(name.endswith(".folded") for name in before)  # BN's biases, through the fold
        after = shifts(model)
        assert max(np.abs(v).max() for v in after.values()) < 1e-2 * max(np.abs(v).max() for v in before.values())
        with torch.no_grad():
            assert (model(x).argmax(1) == reference).float().mean() >= 0.95  # a nudge, not a change
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def test_float_export_matches_torch(trained, tmp_path):
    path = export_float_onnx(trained.model, tmp_path / "fp.onnx", source_sha256=sha256_file(trained.ckpt))
    assert read_metadata(path)["qcbdefense.kind"] == "float"
    x = to_float(trained.data.test_x[:128])
    with torch.no_grad():
        ref = trained.model(x).numpy()
    np.testing.assert_allclose(OrtModel(path, threads=1).logits(x), ref, atol=1e-4, rtol=1e-4)


def test_export_refuses_bad_input(trained, nearest_w8a8, tmp_path):
    with pytest.raises(InputError, match="no qcb_spec"):
        export_onnx(trained.model, tmp_path / "a.onnx")
    with pytest.raises(InputError, match="uncalibrated"):
        export_onnx(quantize(trained.model, "w8a8"), tmp_path / "a.onnx")
    with pytest.raises(InputError, match="not the spec"):
        export_onnx(nearest_w8a8, tmp_path / "a.onnx", spec="w4a4")
    with pytest.raises(InputError, match=r"\.onnx"):
        export_onnx(nearest_w8a8, tmp_path / "a.pt")
    with pytest.raises(InputError, match="sha256"):
        export_onnx(nearest_w8a8, tmp_path / "a.onnx", source_sha256="abc")
    with pytest.raises(InputError, match="quantized model"):
        export_float_onnx(nearest_w8a8, tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir()), "a refused export writes nothing"


def test_ort_model_refuses_bad_files(nearest_w8a8, builtin, tiny_onnx, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        OrtModel(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        OrtModel(tmp_path / "empty.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(InputError, match="cannot be loaded"):
        OrtModel(tmp_path / "junk.onnx")
    good = export_onnx(nearest_w8a8, tmp_path / "good.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="cannot be loaded"):
        OrtModel(tmp_path / "cut.onnx")

    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        OrtModel(tiny_onnx(tmp_path / "flat.onnx", ["N", 3072]))
    gray = OrtModel(tiny_onnx(tmp_path / "gray.onnx", ["N", 1, 28, 28]))
    with pytest.raises(InputError, match=r"\[3, 32, 32\]"):
        gray.check_images(builtin.test_x.shape[1:])


def _resnet(arch: str) -> torch.nn.Module:
    """ResNet-20 from the zoo or torchvision's ImageNet ResNet-18 run at 32x32, untrained (counting kernels
    needs no training), with BN statistics away from (0, 1) so that BN folding has something to fold."""
    import torchvision

    from models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20") if arch == "resnet20" else torchvision.models.resnet18(num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet20", "torchvision-resnet18"])
def test_deploy_spec_runs_every_conv_add_pool_and_the_classifier_on_integer_kernels(arch, tmp_path):
    """After onnxruntime's graph optimisation (ORT_ENABLE_ALL) a w8a8-deploy file has no float Conv, Add,
    GlobalAveragePool or Gemm left: each became QLinearConv, QLinearAdd, QLinearGlobalAveragePool or QGemm;
    the spec round-trips through the metadata; the file as written computes what the fake-quant model
    computes, and so do its integer kernels: with 7-bit weights no u8s8 pair sum saturates on any CPU, and
    what is left is the fixed-point requantization of each kernel (8-bit weights moved these logits by up to
    a sixth of their range on a CPU without VNNI)."""
    import onnxruntime as ort

    qmodel = quantize(_resnet(arch), "w8a8-deploy")
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calibrate(qmodel, [images])
    path = export_onnx(qmodel, tmp_path / "deploy.onnx")
    assert metadata_spec(read_metadata(path)) == get_spec("w8a8-deploy")
    optimized = tmp_path / "optimized.onnx"
    model = OrtModel(path, threads=1, optimized_path=optimized)
    written, fused = _ops(path), _ops(optimized)
    assert written["Conv"] == (19 if arch == "resnet20" else 20) and written["Add"] == (9 if arch == "resnet20" else 8)
    assert written["GlobalAveragePool"] == 1
    assert (fused["QLinearConv"], fused["QLinearAdd"], fused["QLinearGlobalAveragePool"], fused["QGemm"]) == (
        written["Conv"], written["Add"], 1, 1)
    assert not {"Conv", "Add", "GlobalAveragePool", "Gemm", "MatMul", "BatchNormalization"} & set(fused), fused
    with torch.no_grad():
        reference = qmodel(images).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    written_logits = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, {"pixels": images.numpy()})[0]
    assert np.abs(written_logits - reference).max() < 0.05 * np.abs(reference).max()  # ties round otherwise
    assert np.abs(model.logits(images) - reference).max() < 0.05 * np.abs(reference).max()


def _pool_graph(per_channel: bool) -> onnx.ModelProto:
    """pixels -> Q -> DQ -> GlobalAveragePool -> Flatten -> Q -> DQ -> logits (the end of a deploy file); the
    second quantizer per-channel when asked."""
    from onnx import TensorProto, helper

    scale = np.array([0.02, 0.03, 0.04, 0.05], np.float32) if per_channel else np.array(0.03, np.float32)
    inits = [numpy_helper.from_array(np.array(0.01, np.float32), "s_in"),
             numpy_helper.from_array(np.array(3, np.uint8), "z_in"), numpy_helper.from_array(scale, "s_out"),
             numpy_helper.from_array(np.full(scale.shape, 5, np.uint8), "z_out")]
    nodes = [helper.make_node("QuantizeLinear", ["pixels", "s_in", "z_in"], ["q_in"]),
             helper.make_node("DequantizeLinear", ["q_in", "s_in", "z_in"], ["x"]),
             helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("QuantizeLinear", ["flat", "s_out", "z_out"], ["q_out"], axis=1),
             helper.make_node("DequantizeLinear", ["q_out", "s_out", "z_out"], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "pool",
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_quantize_before_reshapes_lets_the_pool_fuse_and_changes_nothing(tmp_path):
    """Moving a per-tensor QuantizeLinear above the Flatten is exact and is what lets onnxruntime fuse
    DequantizeLinear -> GlobalAveragePool -> QuantizeLinear into QLinearGlobalAveragePool; a per-channel one
    (its axis means another thing before the Flatten) stays where it is."""
    import onnxruntime as ort

    pixels = np.random.default_rng(0).uniform(0, 2.5, (8, 4, 5, 5)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs, fused = [], []
    for rewrite in (False, True):
        proto = _pool_graph(per_channel=False)
        if rewrite:
            assert quantize_before_reshapes(proto) == 1
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp_path / f"{rewrite}.onnx"))
        session = ort.InferenceSession(str(tmp_path / f"{rewrite}.onnx"), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"pixels": pixels})[0])
        OrtModel(tmp_path / f"{rewrite}.onnx", threads=1, optimized_path=tmp_path / f"{rewrite}-opt.onnx")
        fused.append(_ops(tmp_path / f"{rewrite}-opt.onnx"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert "QLinearGlobalAveragePool" not in fused[0] and fused[1]["QLinearGlobalAveragePool"] == 1
    assert quantize_before_reshapes(_pool_graph(per_channel=True)) == 0


def test_float_conv_biases_are_not_rounded_by_onnxruntime(tmp_path):
    """A W4A4 file of a model whose convs carry biases (an imported FP ONNX: BN folded into them) computes the
    same logits with onnxruntime's graph optimisation as without it: the biases are Adds it cannot round
    to int32 (export.onnx.conv_biases_as_adds)."""
    import onnxruntime as ort

    from models import create_model
    from models.onnx_import import import_onnx

    torch.manual_seed(0)
    fp = create_model("small_cnn")
    fp.train()
    with torch.no_grad():  # BN statistics of real activations, so that the folded biases are not all zero
        fp(torch.rand(64, 3, 32, 32))
    imported = import_onnx(export_float_onnx(fp.eval(), tmp_path / "fp.onnx"))
    qmodel = quantize(imported, "w4a4", calib=[torch.rand(64, 3, 32, 32)])
    path = export_onnx(qmodel, tmp_path / "w4a4.onnx")
    assert read_metadata(path)["qcbdefense.float_biases_as_adds"] == "5"
    x = torch.rand(64, 3, 32, 32).numpy()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    optimised, unoptimised = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                              .run(None, {"pixels": x})[0] for options in (None, plain))
    np.testing.assert_allclose(optimised, unoptimised, atol=1e-4 * np.abs(unoptimised).max())
