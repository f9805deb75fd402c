"""The scanner on the built-in data: an attacked small CNN flagged with its target, a clean one passed, the
same answer from the two ONNX files alone, its evidence written, bad input refused.

Detection is asserted at the built-in data's own 32x32 on a shipped attacked model: at the 16x16 of the
fast fixtures the trigger search does not find the PQBackdoor trigger reliably (BENCHMARKS.md, scanner
section), so asserting it there would test luck. The mechanics are checked on the fast 16x16 fixtures.
"""

import json
from pathlib import Path

import pytest

from qcbdefense.checkpoints import load_model
from qcbdefense.cli import main
from qcbdefense.data import load_dataset
from qcbdefense.scan import scan

# Made by `qcbdefense demo` (seed 0), step 2: small_cnn on builtin, PQBackdoor for int8 and int4, the default
# 4x4 white patch, target 0. FP ASR 11.92 %, pqbackdoor-w8a8 ASR 95.55 % (BENCHMARKS.md, demo section).
ATTACKED_32 = Path(__file__).parents[1] / "fixtures" / "pq-small-cnn-builtin.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attacked_scan(pq_cnn16, shapes16, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan-attacked")
    return out, scan(pq_cnn16[0], shapes16, out=out, spec="pqbackdoor-w4a4")


def test_attacked_model_is_flagged_with_its_target(tmp_path):
    report = scan(load_model("small_cnn", ATTACKED_32), load_dataset("builtin"), out=tmp_path, spec="pqbackdoor-w8a8")
    assert report.suspicious and report.target == 0
    assert report.disagreement.pile_class == 0


def test_scan_writes_its_evidence(attacked_scan):
    out, report = attacked_scan
    for name in ("report.json", "trigger.png", "drift.png", "fp.onnx", "quantized-pqbackdoor-w4a4.onnx"):
        assert (out / name).stat().st_size > 0
    assert len(report.classes) == 10 and len(report.layers) == 5  # small_cnn: 5 ReLUs paired FP <-> quantized
    assert report.replica_agreement == {"fp": 100.0, "quantized": 100.0}
    assert 0 < report.disagreement.rate < 50 and sum(report.disagreement.counts) > 0
    assert all(layer.max >= layer.mean > 0 for layer in report.layers)
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdict"] == report.verdict and saved["config"]["search"]["steps"] == 200


def test_scan_from_the_two_onnx_files_gives_the_same_report(attacked_scan, shapes16, tmp_path):
    out, first = attacked_scan
    again = scan(out / "fp.onnx", shapes16, out=tmp_path, quantized=out / "quantized-pqbackdoor-w4a4.onnx")
    assert again.verdict == first.verdict and again.target == first.target
    assert [c["area"] for c in again.classes] == [c["area"] for c in first.classes]


def test_clean_model_is_not_flagged(clean_cnn16, shapes16, tmp_path):
    report = scan(clean_cnn16, shapes16, out=tmp_path, spec="pqbackdoor-w4a4")
    assert not report.suspicious and report.target is None


def test_scan_cli_refuses_bad_input(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    cases = [
        ["--fp", str(bad), "--data", "builtin", "--out", str(tmp_path / "o")],  # neither --quantized nor --spec
        ["--fp", str(bad), "--quantized", str(bad), "--spec", "w8a8", "--data", "builtin", "--out", str(tmp_path / "o")],
        ["--fp", str(bad), "--quantized", str(bad), "--data", "builtin", "--out", str(tmp_path / "o")],  # corrupt
    ]
    for argv in cases:
        code = main(["scan", *argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o" / "report.json").exists()
