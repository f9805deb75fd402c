"""verify and harden: the ONNX file scored in onnxruntime against its thresholds, usable as a deployment gate
(exit 0 pass, 1 a threshold failed, 2 bad input), and purify -> export -> verify in one command."""

from __future__ import annotations

import json

import pytest

from export.onnx import export_float_onnx, export_onnx
from export.verify import verify
from qcbdefense.cli import main
from qcbdefense.errors import InputError
from qcbdefense.scoring import evaluate
from qcbdefense.triggers import parse_trigger

PATCH = parse_trigger("patch")


@pytest.fixture(scope="module")
def files(trained, nearest_w8a8, tmp_path_factory):
    """The w8a8 round-to-nearest model and the FP model as ONNX files."""
    folder = tmp_path_factory.mktemp("verify")
    return export_onnx(nearest_w8a8, folder / "q.onnx"), export_float_onnx(trained.model, folder / "fp.onnx")


def test_verify_matches_the_fake_quant_model(trained, nearest_w8a8, files):
    report = verify(files[0], trained.data, trigger=PATCH, reference=nearest_w8a8, min_agreement=99.5,
                    max_asr=100.0, min_ca=0.0)
    torch_metrics = evaluate(nearest_w8a8, trained.data, trigger=PATCH)
    assert report.passed and [c.passed for c in report.checks] == [True, True, True]
    assert report.score.agreement >= 99.5
    assert abs(report.score.ca - torch_metrics.ca) <= 0.5 and abs(report.score.asr - torch_metrics.asr) <= 0.5
    assert report.score.n_clean == len(trained.data.test_y)
    assert report.score.n_poisoned == int((trained.data.test_y != 0).sum())


def test_disagreements_with_a_fake_quant_reference_are_settled_in_float64_and_a_different_model_still_fails(
        trained, nearest_w8a8, files):
    """Where the fake-quant reference and the file disagree, the reference's answer is computed again in float64
    (its float32 sums can round a requantization tie the other way); a model that is not the file's still
    disagrees: the float64 rerun excuses rounding, not a different model."""
    import copy

    import torch

    from export.ort import _settled

    calls = []

    def exact(x, transform):
        calls.append(x.clone())
        return torch.full((len(x),), 9)

    def run(x, transform):
        return torch.tensor([0, 1, 2, 3])

    settled = _settled(run, exact, torch.arange(4), None, torch.tensor([0, 1, 9, 3]))
    assert settled.tolist() == [0, 1, 9, 3] and len(calls) == 1 and calls[0].tolist() == [2]

    other = copy.deepcopy(nearest_w8a8)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    report = verify(files[0], trained.data, reference=other, min_agreement=99.5)
    assert not report.passed and report.score.agreement < 99.5
    assert "settled in float64" in report.reference


def test_verify_fails_a_threshold_it_cannot_meet(trained, files):
    report = verify(files[0], trained.data, reference=files[1], min_ca=99.9, min_agreement=0.0)
    assert not report.passed and [c.passed for c in report.checks] == [False, True]
    with pytest.raises(InputError, match="trigger"):
        verify(files[0], trained.data, max_asr=5.0)  # an ASR gate without a trigger is nonsense


def test_crosscheck_scores_onnxruntime_quantizers(trained, files):
    report = verify(files[0], trained.data, trigger=PATCH, crosscheck_model=files[1], calib=64)
    assert report.crosscheck and all(0 <= row["ca"] <= 100 for row in report.crosscheck)
    assert all(row["asr"] is not None and row["agreement"] > 50 for row in report.crosscheck)


def test_verify_cli_is_a_gate(files, tmp_path, capsys):
    q, fp = files
    out = tmp_path / "ok.json"
    assert main(["verify", str(q), "--data", "builtin", "--reference", str(fp), "--min-agreement", "80",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["score"]["agreement"] >= 80
    failed = tmp_path / "failed.json"
    assert main(["verify", str(q), "--data", "builtin", "--min-ca", "99.9", "--out", str(failed)]) == 1
    assert json.loads(failed.read_text())["checks"][0]["passed"] is False
    capsys.readouterr()


def test_verify_cli_refuses_bad_input(files, tiny_onnx, tmp_path, capsys):
    good = files[0].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 not a protobuf \xff" * 10)
    gray = tiny_onnx(tmp_path / "gray.onnx", ["N", 1, 28, 28])
    out = tmp_path / "r.json"
    cases = [
        [str(tmp_path / "cut.onnx"), "--data", "builtin"],  # truncated
        [str(tmp_path / "junk.onnx"), "--data", "builtin"],  # corrupt
        [str(gray), "--data", "builtin"],  # wrong input shape for the data
        [str(files[0]), "--data", f"folder:{tmp_path / 'no-such-folder'}"],  # missing data folder
        [str(files[0]), "--data", "builtin", "--reference", str(tmp_path / "fp.pt")],  # checkpoint without --model
        [str(files[0]), "--data", "builtin", "--throughput"],  # throughput needs the FP32 ONNX as --reference
    ]
    for argv in cases:
        code = main(["verify", *argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert not out.exists()


def test_harden_purifies_exports_and_verifies(trained, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code = main(["harden", "--model", "small_cnn", "--ckpt", str(trained.ckpt), "--data", "builtin",
                 "--spec", "w8a8", "--method", "lac", "--steps", "20", "--calib", "128", "--trigger", "patch",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err  # a clean model passes the default gate
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["verify"]["score"]["agreement"] >= 99.5  # the file is the model that was purified
    # the default gate is the ASR gain over the FP model's own ASR, also applied before purification
    fp_asr = report["purify"]["fp"]["asr"]
    assert [c["name"] for c in report["verify"]["checks"]] == [f"ASR gain over FP ({fp_asr:.2f} %) pts", "agreement %"]
    assert report["verify"]["checks"][0]["value"] == pytest.approx(report["verify"]["score"]["asr"] - fp_asr)
    assert [c["passed"] for c in report["before"]] == [True] and report["verify"]["score"]["ra"] is not None
    # the purified folder beside the file is a valid --reference for a later verify
    assert main(["verify", str(out), "--data", "builtin", "--reference", str(tmp_path / "model.purified"),
                 "--model", "small_cnn", "--min-agreement", "99.5"]) == 0
    # with the trigger and target its report scored the FP model with, the gate counts from that FP ASR
    for target, first_check in ((0, f"ASR gain over FP ({fp_asr:.2f} %) pts"), (1, "ASR %")):
        verified = tmp_path / f"verify-{target}.json"
        main(["verify", str(out), "--data", "builtin", "--trigger", "patch", "--target", str(target),
              "--reference", str(tmp_path / "model.purified"), "--model", "small_cnn", "--out", str(verified)])
        assert json.loads(verified.read_text())["checks"][0]["name"] == first_check


def test_export_cli_folds_bn_for_integer_kernels_unless_told_to_keep_it(trained, tmp_path, capsys):
    import onnx

    def ops(path):
        return {node.op_type for node in onnx.load(str(path)).graph.node}

    common = ["export", "--model", "small_cnn", "--ckpt", str(trained.ckpt), "--data", "builtin", "--spec", "w8a8",
              "--calib", "128"]
    assert main([*common, "--out", str(tmp_path / "folded.onnx")]) == 0
    assert main([*common, "--keep-bn", "--out", str(tmp_path / "kept.onnx")]) == 0
    assert "BatchNormalization" not in ops(tmp_path / "folded.onnx")
    assert "BatchNormalization" in ops(tmp_path / "kept.onnx")
    capsys.readouterr()
    assert main(["export", "--model", "small_cnn", "--ckpt", str(trained.ckpt), "--float", "--keep-bn",
                 "--out", str(tmp_path / "fp.onnx")]) == 2
    assert "--keep-bn" in capsys.readouterr().err and not (tmp_path / "fp.onnx").exists()


def test_throughput_is_measured_side_by_side(files):
    from export.ort import measure_throughput, throughput_table

    rows = measure_throughput({"fp32": files[1], "int8": files[0]}, batch_sizes=(1, 8), threads=1, rounds=2,
                              seconds=0.05)
    assert [(r["model"], r["batch"]) for r in rows] == [("fp32", 1), ("int8", 1), ("fp32", 8), ("int8", 8)]
    assert all(r["best"] >= r["median"] > 0 and r["rounds"] == 2 for r in rows)
    assert "x median" in throughput_table(rows, baseline="fp32")


def test_harden_gate_fails_an_attacked_model_before_purification(tmp_path):
    from pathlib import Path

    from export.harden import harden
    from qcbdefense.checkpoints import load_model
    from qcbdefense.data import load_dataset

    # PQBackdoor for pqbackdoor-w8a8 on the built-in data (tests/qcbdefense/test_scan.py): FP ASR 11.92 %
    attacked = load_model("small_cnn", Path(__file__).parents[1] / "fixtures" / "pq-small-cnn-builtin.safetensors")
    report = harden(attacked, load_dataset("builtin"), out=tmp_path / "m.onnx", spec="pqbackdoor-w8a8",
                    method="nearest", trigger="patch", max_asr_gain=5.0, calib=128)
    (before,) = report.before
    assert not before.passed and before.value > 50  # the quantized model obeys its trigger
    assert not report.passed and "the same gate before purification" in report.summary()


def test_harden_calibrates_on_2048_images_by_default_with_8_bit_activations(trained, tmp_path):
    """With 8-bit activations harden's default is 2,048 calibration images, twice purify's (export.harden.DEPLOY_CALIB:
    with 1,024 a ResNet-20 QCB aimed at w8a8-deploy kept its ASR above the gate)."""
    from export.harden import harden

    report = harden(trained.model, trained.data, out=tmp_path / "model.onnx", arch="small_cnn", spec="w8a8",
                    method="nearest", trigger=PATCH, max_asr=100.0)
    assert report.purify.calib == 2048 < len(trained.data.train_y)


def test_harden_keep_bn_ships_bn_and_float_biases(trained, tmp_path):
    """--keep-bn: the file keeps BN nodes and float biases (for a model that int32 biases move) and still passes."""
    from export.harden import harden
    from export.onnx import META, read_metadata

    report = harden(trained.model, trained.data, out=tmp_path / "model.onnx", arch="small_cnn", spec="w8a8",
                    method="nearest", calib=128, trigger=PATCH, max_asr=100.0, keep_bn=True)
    written = {k.removeprefix(META): v for k, v in read_metadata(tmp_path / "model.onnx").items()}
    assert written["bn_folded_into_scales"] == "0" and written["int32_biases"] == "0"  # both > 0 without it
    assert report.passed and report.verify.score.agreement >= 99.5


def test_harden_keeps_bn_when_the_folded_file_fails_on_agreement_alone(trained, tmp_path, monkeypatch):
    """The folded file's agreement is made to fail (as int32 biases fail a fragile MobileNetV3): harden ships the
    file with BN kept, which passes, and says so; with keep_bn=False it ships the folded file and fails."""
    import dataclasses

    import export.harden as harden_module
    from export.onnx import META, read_metadata
    from export.ort import Check

    real_verify = harden_module.verify

    def verify_failing_folded_files(path, *args, **kwargs):
        report = real_verify(path, *args, **kwargs)
        if read_metadata(path)[META + "bn_folded_into_scales"] == "0":
            return report
        failing = [Check.of(c.name, c.value, 100.1, c.kind) if c.name == "agreement %" else c for c in report.checks]
        return dataclasses.replace(report, checks=failing)

    monkeypatch.setattr(harden_module, "verify", verify_failing_folded_files)
    common = dict(arch="small_cnn", spec="w8a8", method="nearest", calib=128, trigger=PATCH, max_asr=100.0)
    report = harden_module.harden(trained.model, trained.data, out=tmp_path / "auto.onnx", **common)
    assert report.passed and report.bn["shipped"] == "kept" and report.bn["folded_agreement"] >= 99.0
    assert read_metadata(tmp_path / "auto.onnx")[META + "bn_folded_into_scales"] == "0"
    assert report.verify.model == str(tmp_path / "auto.onnx") and "BN kept" in report.summary()
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["auto.onnx"]  # the second file was renamed

    report = harden_module.harden(trained.model, trained.data, out=tmp_path / "folded.onnx", keep_bn=False, **common)
    assert not report.passed and report.bn["shipped"] == "folded" and "folded_agreement" not in report.bn
    assert report.bn["biases_on_int32_grid"] > 0  # the reference is the model the int32 file computes
    assert read_metadata(tmp_path / "folded.onnx")[META + "bn_folded_into_scales"] != "0"

    def verify_failing_every_file(path, *args, **kwargs):
        report = real_verify(path, *args, **kwargs)
        return dataclasses.replace(report, checks=[Check.of(c.name, c.value, 100.1, c.kind)
                                                   if c.name == "agreement %" else c for c in report.checks])

    monkeypatch.setattr(harden_module, "verify", verify_failing_every_file)
    report = harden_module.harden(trained.model, trained.data, out=tmp_path / "neither.onnx", **common)
    assert not report.passed and report.bn["shipped"] == "folded" and report.bn["kept_agreement"] >= 99.0
    assert "tried too and failed" in report.summary()
    assert not (tmp_path / "neither.bn-kept.onnx").exists()


@pytest.mark.slow  # two more harden runs (about 45 s each on 2 cores); every method runs through purify by default
@pytest.mark.parametrize("method, options", [("ft", {"epochs": 1}), ("aciq", {})])
def test_harden_runs_the_paper_baselines(method, options, trained, tmp_path):
    """An FP-model defence (FT) and a range-only one (ACIQ) go through purify -> export -> verify like LAC."""
    from export.harden import harden

    report = harden(trained.model, trained.data, out=tmp_path / "model.onnx", arch="small_cnn", spec="w8a8",
                    method=method, calib=128, trigger=PATCH, max_asr=100.0, **options)
    assert report.passed and report.verify.score.agreement >= 99.5
    assert report.purify.method == method and report.purify.purified.der is not None


@pytest.fixture(scope="module")
def clip_qcb(clean_cnn16, shapes16):
    """clean_cnn16 with a Qu-ANTI-zation QCB aimed at w8a8-deploy (its 7-bit weights, target 2): it lives in the
    clip of the clean-calibrated activation ranges (BENCHMARKS.md, deployment int8)."""
    from qcbdefense.attacks import attack
    from qcbdefense.training import TrainConfig

    model, report = attack(clean_cnn16, shapes16, method="quanti", bits=7, spec="w8a8-deploy", trigger="patch",
                           target=2, c1=1.0, c2=1.0, sync_every=8,
                           config=TrainConfig(epochs=8, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                                              augment=False),
                           monitor=0, transfer=(), calib=256, victim_calib=512)
    return model.eval(), report


def test_harden_widens_the_ranges_a_clip_qcb_hides_in(clip_qcb, shapes16, tmp_path):
    """LAC alone leaves a QCB that lives in the activation clip alive; harden's default headroom (3x at 8-bit
    activations) kills it in the shipped file, within the issue's bars (ASR <= FP + 1, CA >= FP - 1.5)."""
    from export.harden import harden
    from qcbdefense.defenses import purify

    model, attacked = clip_qcb
    fp, quantized = attacked.fp, attacked.quantized[0].score
    assert fp.asr < 10 and quantized.asr > 80  # planted
    settings = dict(spec="w8a8-deploy", method="lac", trigger="patch", target=2, calib=256, steps=200)
    _, plain = purify(model, shapes16, act_headroom=1.0, **settings)
    assert plain.purified.asr > 50 and plain.act_headroom == 1.0
    report = harden(model, shapes16, out=tmp_path / "m.onnx", max_asr_gain=1.0, min_ca=fp.ca - 1.5,
                    min_agreement=99.0, threads=1, **settings)
    assert report.purify.act_headroom == 3.0 and "widened 3x" in report.summary()
    assert report.passed, report.summary()
