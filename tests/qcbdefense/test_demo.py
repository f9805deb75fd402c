"""The README's main job tells its story: dormant in FP, alive after nearest and flagged by the scan, dead after
LAC+PDA and in ONNX."""

from __future__ import annotations

import pytest

from qcbdefense.demo import bars_figure, run_demo


@pytest.mark.slow
def test_demo_story(tmp_path):
    result = run_demo(tmp_path, log=lambda *_: None)
    for row in result.rows:
        assert row["fp"]["asr"] <= 20.0 and row["nearest"]["asr"] >= 80.0, result.table()
        dead = row["fp"]["asr"] + 1.0  # the FP model's own answer to the trigger (12 %), the demo's gate
        assert row["purified"]["asr"] <= dead and row["onnx"]["asr"] <= dead and row["gate_passed"], result.table()
        assert abs(row["onnx"]["ca"] - row["purified"]["ca"]) <= 1.0, result.table()
        assert row["scan"]["verdict"] == "suspicious" and row["scan"]["target"] == 0, result.table()
    for name in ("report.md", "bars.png", "drift-w8.png", "scan-w4/trigger.png", "backdoored/model.pt"):
        assert (tmp_path / name).is_file(), name


def test_bars_have_a_y_label_and_a_legend_clear_of_the_bars():
    stages = {"fp": (90.0, 10.0), "nearest": (88.0, 97.0), "purified": (87.0, 2.0), "onnx": (87.0, 2.0)}
    row = {stage: {"ca": ca, "asr": asr} for stage, (ca, asr) in stages.items()}
    fig = bars_figure([{**row, "spec": "pqbackdoor-w8a8"}, {**row, "spec": "pqbackdoor-w4a4"}])
    fig.canvas.draw()  # lay out, so extents are final
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert ax.get_ylabel() == "% of test images"
        assert not legend.overlaps(ax.get_window_extent()), "the legend covers a panel"
