"""The int8 files onnxruntime's own quantization tools make, in the replica, the scanner, verify and the gate.

One FP small_cnn at 16x16 (the session's clean_cnn16), quantized by `quantize_static` in each format the
deployer may be handed (QDQ u8s8 / s8s8, per-channel / per-tensor, reduce_range, QOperator) and by
`quantize_dynamic`. onnxruntime removes the ReLU behind each activation quantizer, so drift must pair layers
by their weights; `quantize_static` copies the FP file's metadata, so provenance must come from the graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from onnxruntime.quantization import quantize_dynamic

from export.crosscheck import OrtQuantizer, ort_quantize
from export.onnx import export_float_onnx, export_onnx
from export.ort import OrtModel
from export.provenance import describe_onnx, metadata_conflicts
from export.replica import OnnxReplica, check_agreement
from export.scan_files import scan_onnx
from export.verify import verify
from qcbdefense.cli import main
from qcbdefense.data import load_dataset, to_float
from qcbdefense.errors import InputError
from qcbdefense.quant.inspect import integer_weights
from qcbdefense.quant.ptq import calibration_images, post_training_quantize
from qcbdefense.scanner import ScanConfig, SearchConfig
from qcbdefense.scanner.files import plot_drift
from qcbdefense.scanner.scan import measure_drift
from qcbdefense.triggers import parse_trigger

# name: (format, activation type, per-channel, reduce_range, the label describe_onnx must give)
VARIANTS = {
    "qdq-u8s8-pc": ("QDQ", "QUInt8", True, False, "QDQ, int8 weights per-channel, uint8 activations"),
    "qdq-u8s8-pt": ("QDQ", "QUInt8", False, False, "QDQ, int8 weights per-tensor, uint8 activations"),
    "qdq-u8s8-pc-rr": ("QDQ", "QUInt8", True, True,
                       "QDQ, int8 weights per-channel (reduce_range: 7 bits), uint8 activations"),
    "qdq-s8s8-pc": ("QDQ", "QInt8", True, False, "QDQ, int8 weights per-channel, int8 activations"),
    "qdq-s8s8-pt": ("QDQ", "QInt8", False, False, "QDQ, int8 weights per-tensor, int8 activations"),
    "qop-u8s8": ("QOperator", "QUInt8", True, False, "QOperator, int8 weights per-channel, uint8 activations"),
    "qop-s8s8": ("QOperator", "QInt8", True, False, "QOperator, int8 weights per-channel, int8 activations"),
}


@pytest.fixture(scope="module")
def ort_files(clean_cnn16, shapes16, tmp_path_factory):
    """The FP ONNX of clean_cnn16 (with our float metadata) and every quantize_static / quantize_dynamic file."""
    folder = tmp_path_factory.mktemp("ort-files")
    fp = export_float_onnx(clean_cnn16, folder / "fp.onnx", input_size=(16, 16))
    images = calibration_images(shapes16, 128, seed=0)
    files = {"fp": fp}
    for name, (fmt, act, per_channel, reduce_range, _) in VARIANTS.items():
        files[name] = ort_quantize(fp, folder / f"{name}.onnx", images,
                                   OrtQuantizer(name, "QInt8", act, per_channel), quant_format=fmt,
                                   reduce_range=reduce_range)
    quantize_dynamic(str(folder / "qdq-u8s8-pc-preprocessed.onnx"), str(folder / "dynamic.onnx"))
    files["dynamic"] = folder / "dynamic.onnx"
    return files


@pytest.mark.parametrize("name", [*VARIANTS, "dynamic"])
def test_replica_runs_each_onnxruntime_file_and_provenance_reads_its_graph(name, ort_files, shapes16):
    path = ort_files[name]
    x = to_float(shapes16.test_x[:300])
    replica = OnnxReplica(path)
    with torch.no_grad():
        got = replica(x)
    expected = torch.from_numpy(OrtModel(path).logits(x))
    graph = describe_onnx(path)
    # 8-bit kernels may saturate in onnxruntime on a CPU without VNNI (the replica is exact): a few flips
    floor = 95.0 if graph.saturates_without_vnni else 99.0
    assert 100.0 * (got.argmax(1) == expected.argmax(1)).float().mean() >= floor
    if name == "dynamic":
        assert graph.label == "dynamic, int8 weights per-tensor, uint8 activations (computed per batch)"
    else:
        assert graph.label == VARIANTS[name][4]
        assert [layer.op for layer in replica.layers][-1] in ("Gemm", "QGemm") and len(replica.layers) == 6
    # quantize_static copied the FP file's "qcbdefense.kind = float": the graph contradicts it
    assert metadata_conflicts(OrtModel(path).metadata, graph)[0].startswith("metadata says float")

    xg = x[:4].clone().requires_grad_()
    replica(xg)[:, 0].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_the_ort_preset_holds_the_conv_integers_quantize_static_writes(ort_files, clean_cnn16, shapes16):
    """`ort-w8a8` quantizes the unfolded convs; quantize_static folds BN first and quantizes per channel: the
    same integers up to each channel's sign (a negative BN scale flips it), so a QCB aimed at one fires in both."""
    proto = onnx.load(str(ort_files["qdq-u8s8-pc"]))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    theirs = [initializers[dequantized[n.input[1]]] for n in proto.graph.node if n.op_type == "Conv"]
    qmodel = post_training_quantize(clean_cnn16, "ort-w8a8", shapes16, calib=128)
    ours = [w.int_weight.numpy() for w in integer_weights(qmodel).values() if w.int_weight.dim() == 4]
    assert len(ours) == len(theirs) > 0
    for mine, their in zip(ours, theirs):
        assert mine.shape == their.shape and their.dtype == np.int8
        assert np.abs(mine).max() == 127 and np.mean(np.abs(mine) == np.abs(their)) >= 0.999


def test_provenance_of_our_own_exports_matches_their_metadata(clean_cnn16, shapes16, tmp_path):
    qmodel = post_training_quantize(clean_cnn16, "w4a4", shapes16, calib=128)
    path = export_onnx(qmodel, tmp_path / "w4a4.onnx", input_size=(16, 16))
    graph = describe_onnx(path)
    assert graph.format == "QDQ" and graph.layer_weight_bits == [8, 4, 4, 4, 4, 8]  # first/last layer at 8 bits
    assert graph.activation_bits == 4
    assert metadata_conflicts(OrtModel(path).metadata, graph) == []
    assert describe_onnx(export_float_onnx(clean_cnn16, tmp_path / "fp.onnx", input_size=(16, 16))).label == "float"


def test_drift_pairs_a_qdq_file_whose_relus_onnxruntime_removed(ort_files, shapes16, tmp_path):
    fp, quantized = OnnxReplica(ort_files["fp"]), OnnxReplica(ort_files["qdq-s8s8-pc"])
    assert any(n.op_type == "Relu" for n in fp.nodes) and not any(n.op_type == "Relu" for n in quantized.nodes)
    x = to_float(shapes16.test_x[:64])
    layers, _, _, pairing = measure_drift(fp, quantized, x)
    assert len(layers) == 6 and pairing.startswith("6 conv/linear layers paired")
    assert all(0 < layer.mean <= layer.max for layer in layers)
    assert all(layer.max < 1.0 for layer in layers)  # 8-bit rounding noise, not another network

    other = OnnxReplica(ort_files["dynamic"])  # no layer with float-scaled weights to pair with
    layers, _, _, pairing = measure_drift(fp, other, x)
    assert layers == [] and pairing.startswith("cannot pair layers")
    plot_drift(tmp_path / "drift.png", {"quantized": layers}, title="t", note=pairing)
    assert (tmp_path / "drift.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["qdq-s8s8-pt", "qop-s8s8"])
def test_scan_gives_a_verdict_and_drift_on_a_quantize_static_file(name, ort_files, shapes16, tmp_path):
    config = ScanConfig(images=256, search=SearchConfig(steps=30), sparse=SearchConfig(steps=30))
    report = scan_onnx(ort_files["fp"], ort_files[name], shapes16, out=tmp_path, config=config)
    assert report.verdict in ("clean", "suspicious") and len(report.layers) == 6
    graphs = report.files["graphs"]
    assert graphs["fp"]["label"] == "float" and graphs["quantized"]["label"] == VARIANTS[name][4]
    assert graphs["quantized"]["metadata_conflicts"]
    assert "WARNING metadata says float" in report.summary()
    assert json.loads((tmp_path / "report.json").read_text())["drift_pairing"].startswith("6 conv/linear")


def test_replica_disagreement_names_the_cause_and_the_remedy(ort_files, shapes16, monkeypatch):
    import export.provenance

    replica = OnnxReplica(ort_files["qdq-u8s8-pc"])
    x = to_float(shapes16.test_x[:50])
    wrong = np.roll(OrtModel(ort_files["qdq-u8s8-pc"]).logits(x), 1, axis=1)  # onnxruntime "disagrees"
    monkeypatch.setattr(export.provenance, "has_vnni", lambda: False)
    with pytest.raises(InputError, match="8-bit integer kernels .* no VNNI.* reduce_range=True.*"
                                         "--min-replica-agreement"):
        check_agreement(replica, x, wrong, 99.0)
    assert check_agreement(replica, x, wrong, 0.0) < 99.0  # the threshold is an option


def test_verify_reads_a_quantize_dynamic_file_and_flags_its_metadata(ort_files, shapes16):
    report = verify(ort_files["dynamic"], shapes16, trigger=parse_trigger("patch"), reference=ort_files["fp"],
                    min_agreement=90.0)
    assert report.graph["format"] == "dynamic" and report.passed
    assert report.score.ra is not None and report.reference_score.ra is not None and 0 <= report.score.ra <= 100
    summary = report.summary()
    assert "graph: dynamic" in summary and "WARNING: metadata says float" in summary and "RA %" in summary


def test_gate_judges_asr_against_the_fp_models_own(ort_files, clean_cnn16, shapes16, tmp_path, capsys):
    trigger = parse_trigger("patch")
    report = verify(ort_files["qdq-s8s8-pc"], shapes16, trigger=trigger, reference=ort_files["fp"],
                    max_asr_gain=5.0)
    (check,) = report.checks
    assert check.name.startswith("ASR gain over FP") and check.value == pytest.approx(
        report.score.asr - report.reference_score.asr)
    assert report.reference_score.asr > 0  # the clean FP model already sends some triggered images to the target
    strict = verify(ort_files["qdq-s8s8-pc"], shapes16, trigger=trigger, reference=ort_files["fp"],
                    max_asr_gain=0.0, baseline_asr=report.score.asr + 1.0)
    assert strict.passed and strict.checks[0].value == pytest.approx(-1.0)
    with pytest.raises(InputError, match="max_asr_gain"):
        verify(ort_files["qdq-s8s8-pc"], shapes16, trigger=trigger, max_asr_gain=5.0)

    # the CLI's default gate with an FP reference is the gain, not the absolute ASR
    fp32 = export_float_onnx(clean_cnn16, tmp_path / "fp32.onnx")  # the CLI reads the built-in data at 32x32
    q32 = ort_quantize(fp32, tmp_path / "q32.onnx", calibration_images(load_dataset("builtin"), 64, seed=0),
                       OrtQuantizer("s8s8", "QInt8", "QInt8"))
    out = tmp_path / "verify.json"
    code = main(["verify", str(q32), "--data", "builtin", "--trigger", "patch", "--reference", str(fp32),
                 "--min-agreement", "50", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [c["name"].split(" (")[0] for c in saved["checks"]] == ["ASR gain over FP", "agreement %"]
    assert code == (0 if all(c["passed"] for c in saved["checks"]) else 1)
    assert "RA %" in capsys.readouterr().out


class _Blocks(torch.nn.Module):
    """The activations and blocks of mobilenet_v3 / efficientnet / a user's module, small: Hardswish,
    squeeze-excitation (ReduceMean, Hardsigmoid, Mul), SiLU (Sigmoid), GELU (Erf), LeakyReLU, Concat, AvgPool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze, self.excite = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 8, 1)
        self.branch = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.stem(x))
        se = torch.nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x * se
        y = torch.nn.functional.silu(self.branch(x))
        z = torch.nn.functional.leaky_relu(torch.nn.functional.gelu(x), 0.1)
        x = torch.nn.functional.avg_pool2d(torch.cat([y, z], 1), 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind", ["float", "QDQ", "QOperator"])
def test_replica_runs_the_blocks_of_mobile_networks(kind, shapes16, tmp_path):
    torch.manual_seed(0)
    path = export_float_onnx(_Blocks().eval(), tmp_path / "fp.onnx", input_size=(16, 16))
    if kind != "float":  # int8 activations and 7-bit weights: no kernel saturation, the replica must match
        path = ort_quantize(path, tmp_path / "q.onnx", calibration_images(shapes16, 64, seed=0),
                            OrtQuantizer("s8s8", "QInt8", "QInt8"), quant_format=kind, reduce_range=True)
    ops = {node.op_type for node in OnnxReplica(path).nodes}
    assert {"HardSigmoid", "Sigmoid", "Erf"} <= ops or {"QLinearSigmoid", "QLinearMul", "QLinearConcat"} <= ops
    x = to_float(shapes16.test_x[:100])
    expected = OrtModel(path).logits(x)
    with torch.no_grad():
        got = OnnxReplica(path)(x).numpy()
    assert np.abs(got - expected).max() <= (1e-4 if kind == "float" else 0.05) * np.abs(expected).max()
