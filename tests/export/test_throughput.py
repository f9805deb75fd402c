"""verify --throughput's comparison: the shipped file beside FP32 and onnxruntime's own int8, and the CPU's flags."""

from __future__ import annotations

import pytest

from export.onnx import export_float_onnx, export_onnx
from export.throughput import BASELINE, ORT_INT8, THIS, compare_throughput, cpu_int8_features
from qcbdefense.errors import InputError

CPUINFO = """processor\t: 0
model name\t: Some CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}

processor\t: 1
model name\t: Some CPU @ 2.00GHz
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}
"""


@pytest.mark.parametrize("extra,vnni", [("avx512_vnni", True), ("avx_vnni", True), ("", False)])
def test_cpu_int8_features_says_whether_the_cpu_has_vnni(extra, vnni, tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(extra=extra))
    features = cpu_int8_features(tmp_path / "cpuinfo")
    assert features["model"] == "Some CPU @ 2.00GHz" and features["vnni"] is vnni
    assert features["flags"] == ["avx2", "avx512f", "avx512bw", *([extra] if extra else [])]
    assert cpu_int8_features(tmp_path / "missing") == {"model": None, "flags": [], "vnni": False}


def test_compare_throughput_times_three_files_side_by_side(trained, nearest_w8a8, tmp_path):
    ours = export_onnx(nearest_w8a8, tmp_path / "int8.onnx")
    fp = export_float_onnx(trained.model, tmp_path / "fp.onnx")
    result = compare_throughput(ours, fp, trained.data, calib=64, threads=1, batch_sizes=(1, 4), rounds=1,
                                seconds=0.01, keep_dir=tmp_path / "ort")
    assert [(r["model"], r["batch"]) for r in result.rows] == [
        (name, batch) for batch in (1, 4) for name in (BASELINE, ORT_INT8, THIS)]
    assert all(r["median"] > 0 for r in result.rows) and result.ratio(THIS, THIS, 4) == 1.0
    assert (tmp_path / "ort" / f"{ORT_INT8}.onnx").is_file()  # onnxruntime's own int8 file, kept when asked
    assert "VNNI" in result.table() and result.settings["calib"] == 64
    with pytest.raises(InputError, match="already quantized"):  # the FP32 side must be the FP model
        compare_throughput(ours, ours, trained.data, calib=64, threads=1, rounds=1, seconds=0.01)
