"""Scanning an FP / quantized pair for a dormant quantization-conditioned backdoor, without the trigger."""

from qcbdefense.scan.scan import ScanConfig, ScanReport, prepare_pair, scan, verdict_label
from qcbdefense.scan.trigger_search import SearchConfig

__all__ = ["ScanConfig", "ScanReport", "SearchConfig", "prepare_pair", "scan", "verdict_label"]
