"""ONNX export and onnxruntime verification: the file that ships is the file that is checked.

`export_onnx` writes a quantized (nearest or purified) model as QCDQ ONNX with provenance metadata,
`evaluate_onnx` / `verify` run the file in onnxruntime (CA, ASR, agreement, thresholds), `crosscheck`
quantizes the FP model with onnxruntime's own quantizer, and `harden` does purify -> export -> verify.
Beside the core as brevitas_examples beside brevitas: the core library never imports it (the CLI and the demo do).
"""

from export.onnx import export_float_onnx, export_onnx, read_metadata
from export.ort import OrtModel, VerifyReport, evaluate_onnx, measure_throughput
from export.verify import verify

__all__ = ["export_onnx", "export_float_onnx", "read_metadata", "OrtModel", "VerifyReport", "evaluate_onnx",
           "measure_throughput", "verify"]
