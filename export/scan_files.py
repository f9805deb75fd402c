"""Scanning two ONNX files, what a deployer holds: the FP model and the int8/int4 model that ships.

Both files run as differentiable torch replicas (`export.replica`), each checked against onnxruntime before it is
trusted, and the scan itself is `qcbdefense.scanner.scan_models`. An FP model given as a module is exported here
first (its ONNX file is what the quantized file is compared with). The report records the files, their
hashes, what each graph is (`provenance.describe_onnx`) and the replicas' agreement with onnxruntime.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from export.onnx import export_float_onnx, export_onnx
from export.ort import OrtModel
from export.provenance import describe_onnx, metadata_conflicts
from export.replica import OnnxReplica, check_agreement
from qcbdefense.data import Dataset
from qcbdefense.errors import InputError
from qcbdefense.fileio import sha256_file
from qcbdefense.quant.ptq import post_training_quantize
from qcbdefense.scanner.files import write_scan
from qcbdefense.scanner.scan import ScanConfig, ScanReport, scan_images, scan_models


def export_pair(out: Path, fp: nn.Module, spec: str, data: Dataset, *, calib: int = 512, seed: int = 0,
                source_sha256: str | None = None) -> tuple[Path, Path]:
    """fp.onnx and quantized-<spec>.onnx in `out`: `fp` exported, and its quantization under `spec` (round to
    nearest, calibrated on `calib` clean training images) exported as it would ship."""
    size = tuple(data.test_x.shape[-2:])
    fp_onnx = export_float_onnx(fp, out / "fp.onnx", source_sha256=source_sha256, input_size=size)
    qmodel = post_training_quantize(fp, spec, data, calib=calib, seed=seed)
    return fp_onnx, export_onnx(qmodel, out / f"quantized-{qmodel.qcb_spec.name}.onnx",
                                source_sha256=source_sha256, input_size=size)


def scan_onnx(fp: nn.Module | str | os.PathLike, quantized: str | os.PathLike, data: Dataset, *,
              out: str | os.PathLike | None = None, config: ScanConfig = ScanConfig(),
              device: str | torch.device = "cpu", source_sha256: str | None = None,
              progress: bool = False) -> ScanReport:
    """Scan the FP model (an .onnx file, or a module exported to `out`/fp.onnx) against the quantized .onnx
    file; with `out`, writes report.json, trigger.png and drift.png there (`qcbdefense.scanner.files`)."""
    start = time.perf_counter()
    if isinstance(fp, nn.Module):
        if out is None:
            raise InputError("scanning an FP module against an ONNX file exports it: give an output folder")
        Path(out).mkdir(parents=True, exist_ok=True)
        fp_onnx = export_float_onnx(fp, Path(out) / "fp.onnx", source_sha256=source_sha256,
                                    input_size=tuple(data.test_x.shape[-2:]))
    else:
        fp_onnx = Path(fp)
        if fp_onnx.suffix.lower() != ".onnx":
            raise InputError(f"--fp {fp_onnx}: give an .onnx file, or a checkpoint with --model")
    q_onnx = Path(quantized)
    fp_rep, q_rep = OnnxReplica(fp_onnx), OnnxReplica(q_onnx)
    shape = (3,) + tuple(data.test_x.shape[-2:])
    x = scan_images(data, config.images, config.seed)
    agreement, graphs = {}, {}
    for name, path, replica in (("fp", fp_onnx, fp_rep), ("quantized", q_onnx, q_rep)):
        session = OrtModel(path, threads=None)
        session.check_images(shape, what=f"the data {data.name}")
        if session.num_classes is not None and session.num_classes != data.num_classes:
            raise InputError(f"cannot scan {path}: it has {session.num_classes} classes but the data {data.name} "
                             f"has {data.num_classes}")
        agreement[name] = check_agreement(replica, x[:128], session.logits(x[:128]), config.min_replica_agreement)
        graph = describe_onnx(path)
        graphs[name] = {**graph.to_dict(), "metadata_conflicts": metadata_conflicts(session.metadata, graph)}
    prepared = time.perf_counter()
    dev = torch.device(device)
    report = scan_models(fp_rep.to(dev), q_rep.to(dev), x.to(dev), config=config, class_names=data.classes,
                         progress=progress)
    report.files.update(fp_onnx=str(fp_onnx), fp_sha256=sha256_file(fp_onnx), quantized_onnx=str(q_onnx),
                        quantized_sha256=sha256_file(q_onnx), graphs=graphs)
    report.replica_agreement.update(agreement)
    report.config["data"] = data.describe()
    report.seconds["prepare"] = prepared - start
    report.seconds["total"] = time.perf_counter() - start
    if out is not None:
        write_scan(Path(out), report, x[0], title=f"activation drift from FP: {fp_onnx.name} vs {q_onnx.name}")
    return report
