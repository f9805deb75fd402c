"""Scanning an FP / quantized pair for a dormant quantization-conditioned backdoor, without the trigger."""

from qcbdefense.scanner.scan import ScanConfig, ScanReport, scan, scan_models, verdict_label
from qcbdefense.scanner.screen import ScreenConfig
from qcbdefense.scanner.trigger_search import SearchConfig

__all__ = ["ScanConfig", "ScanReport", "ScreenConfig", "SearchConfig", "scan", "scan_models", "verdict_label"]
