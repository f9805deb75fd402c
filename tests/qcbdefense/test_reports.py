"""Every report round-trips JSON through the one results model (`qcbdefense.report`), and refuses another
version, an unknown key and a missing one in one InputError line. Tiny objects, no training."""

from __future__ import annotations

import json

import pytest

from export.harden import HardenReport
from export.ort import Check, VerifyReport
from qcbdefense.attacks.base import AttackReport, PlantCriteria, make_config
from qcbdefense.bench import BenchConfig, BenchResults, BenchRow
from qcbdefense.clean_training import TrainReport
from qcbdefense.defenses.base import PurifyReport
from qcbdefense.errors import InputError
from qcbdefense.quant.ptq import PTQReport, SpecResult
from qcbdefense.quant.spec import get_spec
from qcbdefense.report import Report, encode
from qcbdefense.scanner.drift import Disagreement, LayerDrift
from qcbdefense.scanner.scan import ScanReport
from qcbdefense.scanner.square_scan import SquareFind
from qcbdefense.scoring import Score
from qcbdefense.training import EpochRecord, TrainConfig

SCORE = Score(ca=91.5, asr=4.25, ra=88.0, agreement=99.5, per_class_accuracy=[90.0, 93.0], n_clean=20,
              n_poisoned=10)
NEAREST = Score(ca=90.0, asr=97.0, ra=2.0, agreement=98.0, der=50.0)
EPOCHS = [EpochRecord(epoch=1, loss=0.5, seconds=1.5, metrics={"ca": 80.0}, steps=4)]
DATASET = {"name": "builtin", "train": 40, "test": 20}
BENCH = BenchConfig.from_dict({"name": "t", "model": "small_cnn", "data": "builtin", "clean": {"epochs": 1},
                               "attacks": [{"name": "pq", "method": "pqbackdoor", "bits": 4}]})


def ptq_report() -> PTQReport:
    return PTQReport("small_cnn", DATASET, {"kind": "patch"}, 0, 16, 0, SCORE,
                     [SpecResult(get_spec("w8a8"), NEAREST, 0.5, 0.25)])


def purify_report() -> PurifyReport:
    return PurifyReport(method="lac", arch="small_cnn", spec=get_spec("w4a4"), dataset=DATASET, calib=16, seed=0,
                        device="cpu", options={"steps": 4}, trigger={"kind": "patch"}, target=0, fp=SCORE,
                        nearest=NEAREST, purified=Score(ca=89.0, asr=3.0, agreement=97.0, der=96.0),
                        layers=[{"name": "conv1", "steps": 4}], skipped_layers=[], seconds={"total": 1.0},
                        peak_memory_mb={"rss": 100.0}, trigger_search=None, data_used={"unlabeled_train_images": 16},
                        act_headroom=1.0,
                        equalize={"mode": "auto", "calib_agreement": {"plain": 97.0, "equalized": 98.5}},
                        equalized={"bn1": [1.0, 4.0]})


def verify_report() -> VerifyReport:
    return VerifyReport(model="m.onnx", sha256="ab", metadata={"qcbdefense.kind": "quantized"}, dataset=DATASET,
                        trigger=None, target=0, score=SCORE, reference="purified model",
                        reference_score=Score(ca=91.0), checks=[Check.of("CA %", 91.5, 50.0, "min")])


REPORTS = {
    "train": lambda: TrainReport("small_cnn", TrainConfig(epochs=1), DATASET, None, EPOCHS, SCORE),
    "quantize": ptq_report,
    "attack": lambda: AttackReport("small_cnn", None, make_config(method="quanti", bits="8,4"), DATASET,
                                   {"train": EPOCHS}, SCORE, [SpecResult(get_spec("w8a8"), NEAREST, 0.5, 0.25)],
                                   None, {"quantizer_syncs": 2}, {"train": 1.0}, clean=ptq_report(),
                                   criteria=PlantCriteria(), misses=["W4 ASR 10.0 % < 90"]),
    "purify": purify_report,
    "verify": verify_report,
    "bench": lambda: BenchResults(BENCH, 1, [BenchRow("clean", "w8a8", SCORE, {"lac": {"ca": 90.0, "seconds": 1.0}},
                                                      {"verdict": "clean", "target": None}),
                                             BenchRow("pq", "w4a4", SCORE, not_planted="W4 ASR 10.0 % < 90")], 3.5),
    "scan": lambda: ScanReport(verdict="suspicious", score=1.5, target=0,
                               classes=[{"class": 0, "area": 9.0, "success": 95.0, "score": 1.5}],
                               squares=[SquareFind(target=0, top=1, left=2, size=3, fill="white", scan_gap=0.5,
                                                   gap=0.4, anomaly=2.0, effect=1.5, found=True)],
                               disagreement=Disagreement(rate=2.0, counts=[3, 0], pile_class=0, pile_share=100.0),
                               layers=[LayerDrift(layer=0, tensor="t0", mean=0.1, max=0.9, concentration=3.0,
                                                  top_channels=[(4, 0.9), (1, 0.5)])],
                               files={"fp_onnx": "fp.onnx"}, replica_agreement={"fp": 100.0}, config={"images": 64},
                               seconds={"total": 3.0}, best_class=0, family="patch", signals={"total": 1.5},
                               drift_pairing="paired by order"),
    "harden": lambda: HardenReport(onnx="m.onnx", purified_dir="m.purified", purify=purify_report(),
                                   verify=verify_report(), seconds={"total": 2.0},
                                   before=[Check.of("ASR %", 97.0, 5.0, "max")]),
}


@pytest.fixture(params=sorted(REPORTS))
def report(request) -> Report:
    return REPORTS[request.param]()


def test_a_report_round_trips_through_json_and_a_file(report, tmp_path):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["version"] == report.VERSION
    again = type(report).from_dict(data)
    assert again == report and again.to_dict() == data
    assert type(report).load(report.save(tmp_path / "report.json")) == report


def test_a_report_refuses_another_version_an_unknown_key_and_a_missing_one(report):
    data = json.loads(json.dumps(report.to_dict()))
    cls = type(report)
    with pytest.raises(InputError, match=f"{cls.KIND} version 0 is not supported"):
        cls.from_dict({**data, "version": 0})
    with pytest.raises(InputError, match="unknown .* key.*: surprise"):
        cls.from_dict({**data, "surprise": 1})
    with pytest.raises(InputError, match="lacks key.*: environment"):
        cls.from_dict({key: value for key, value in data.items() if key != "environment"})
    with pytest.raises(InputError, match="must be a mapping"):
        cls.from_dict([data])


def test_a_nested_record_is_checked_too():
    data = json.loads(json.dumps(purify_report().to_dict()))
    data["fp"]["surprise"] = 1
    with pytest.raises(InputError, match="unknown purify report fp key"):
        PurifyReport.from_dict(data)


def test_a_scores_predictions_are_neither_saved_nor_compared():
    import torch

    score = Score(ca=50.0, predictions=torch.tensor([1, 0]))
    assert "predictions" not in encode(score) and score == Score(ca=50.0)


def test_a_broken_file_is_one_line(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="purify report .* is not valid JSON"):
        PurifyReport.load(path)
    with pytest.raises(InputError, match="does not exist"):
        PurifyReport.load(tmp_path / "none.json")
