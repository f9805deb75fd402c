"""The README's main job tells its story: dormant in FP, alive after nearest and flagged by the scan, dead after
LAC+PDA and in ONNX."""

from __future__ import annotations

import pytest

from qcbdefense.demo import run_demo


@pytest.mark.slow
def test_demo_story(tmp_path):
    result = run_demo(tmp_path, log=lambda *_: None)
    for row in result.rows:
        assert row["fp"]["asr"] <= 20.0 and row["nearest"]["asr"] >= 80.0, result.table()
        assert row["purified"]["asr"] <= 10.0 and row["onnx"]["asr"] <= 10.0, result.table()
        assert abs(row["onnx"]["ca"] - row["purified"]["ca"]) <= 1.0, result.table()
        assert row["scan"]["verdict"] == "suspicious" and row["scan"]["target"] == 0, result.table()
    for name in ("report.md", "bars.png", "drift-w8.png", "scan-w4/trigger.png", "backdoored/model.pt"):
        assert (tmp_path / name).is_file(), name
