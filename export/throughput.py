"""Is the shipped int8 file worth deploying? Its throughput beside the FP32 file and onnxruntime's own int8 file.

A deployer who finds our file slower than what `onnxruntime.quantization.quantize_static` makes of the same FP
model will ship theirs, unpurified. So `compare_throughput` times three files side by side in one process
(`export.ort.measure_throughput`: interleaved rounds, so a load spike from another process hits all alike):

    fp32             the FP model's float ONNX
    ort-int8         `quantize_static` of that file: QDQ, per-channel QInt8 weights, QUInt8 activations
                     (u8s8, the configuration its docstring recommends for x86), calibrated on clean images
    this file        the file that ships

at batch 1 and 64, and reports the CPU's int8 features: without VNNI (AVX-512 VNNI or AVX-VNNI) x86 multiplies
u8 by s8 with VPMADDUBSW and int8 gains little over FP32, so a ratio means little without them.

Examples:
    >>> result = compare_throughput("model.onnx", "fp.onnx", load_dataset("builtin"))  # doctest: +SKIP
    >>> print(result.table())                                                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from export.crosscheck import ORT_QUANTIZERS, float_onnx_path, ort_quantize
from export.ort import OrtModel, measure_throughput, throughput_table
from qcbdefense.data import Dataset
from qcbdefense.errors import check_number
from qcbdefense.quant.ptq import calibration_images

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
BASELINE, ORT_INT8, THIS = "fp32", "ort-int8", "this file"


def cpu_int8_features(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """The CPU's model name and which of `INT8_FLAGS` it has (from the first processor's `flags` line), and
    whether it has VNNI; {"model": None, ...} where /proc/cpuinfo is not there (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"model": None, "flags": [], "vnni": False}
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    present = [flag for flag in INT8_FLAGS if flag in flags]
    return {"model": model, "flags": present, "vnni": any(flag in flags for flag in VNNI_FLAGS)}


@dataclass
class ThroughputComparison:
    """`measure_throughput` rows for fp32 / ort-int8 / this file, the CPU they ran on, and the settings."""

    rows: list[dict]
    cpu: dict = field(default_factory=cpu_int8_features)
    settings: dict = field(default_factory=dict)

    def ratio(self, model: str, over: str, batch: int) -> float:
        """Median throughput of `model` over `over` at `batch`."""
        rate = {(r["model"], r["batch"]): r["median"] for r in self.rows}
        return rate[(model, batch)] / rate[(over, batch)]

    def table(self) -> str:
        cpu = self.cpu
        flags = ", ".join(cpu["flags"]) or "none of " + ", ".join(INT8_FLAGS)
        batches = sorted({r["batch"] for r in self.rows})
        ratios = "; ".join(f"batch {b}: {self.ratio(THIS, ORT_INT8, b):.2f}x {ORT_INT8}, "
                           f"{self.ratio(THIS, BASELINE, b):.2f}x {BASELINE}" for b in batches)
        return "\n".join([
            f"CPU: {cpu['model'] or 'unknown'}; int8 features: {flags}; VNNI: {'yes' if cpu['vnni'] else 'no'}"
            + ("" if cpu["vnni"] else " (u8s8 through VPMADDUBSW: expect int8 close to FP32)"),
            throughput_table(self.rows, baseline=BASELINE),
            f"{THIS} (medians): {ratios}",
        ])

    def to_dict(self) -> dict:
        return asdict(self)


def compare_throughput(onnx_path: str | os.PathLike, fp_onnx: str | os.PathLike, data: Dataset, *,
                       calib: int = 512, seed: int = 0, threads: int = 2, batch_sizes: Sequence[int] = (1, 64),
                       rounds: int = 10, seconds: float = 0.5,
                       keep_dir: str | os.PathLike | None = None) -> ThroughputComparison:
    """Quantize `fp_onnx` with `quantize_static` (on `calib` clean training images of `data`, seeded) and
    time it, `fp_onnx` and `onnx_path` side by side (see `export.ort.measure_throughput`).

    `keep_dir`: keep the ORT-quantized file there (default: a temporary folder, deleted).
    """
    check_number("calib", calib, integer=True, low=1, kind="a number of images")
    this = OrtModel(onnx_path, threads=threads)  # refuses a bad file before the quantizer runs
    this.check_images(data.test_x.shape[1:], what=f"the data {data.name!r}")
    with tempfile.TemporaryDirectory(prefix="qcb-throughput-") as scratch:
        folder = Path(keep_dir) if keep_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        fp_path = float_onnx_path(fp_onnx, folder)
        ort_int8 = ort_quantize(fp_path, folder / f"{ORT_INT8}.onnx", calibration_images(data, calib, seed=seed),
                                ORT_QUANTIZERS[0])
        rows = measure_throughput({BASELINE: fp_path, ORT_INT8: ort_int8, THIS: onnx_path},
                                  batch_sizes=batch_sizes, threads=threads, rounds=rounds, seconds=seconds)
    return ThroughputComparison(rows, settings={"calib": calib, "seed": seed, "threads": threads,
                                                "batch_sizes": list(batch_sizes), "rounds": rounds,
                                                "seconds": seconds, "ort_quantizer": "QDQ, per-channel QInt8 "
                                                "weights, QUInt8 activations"})
