"""What every run records beside its results: versions, device and time, so a figure can be traced and rerun."""

from __future__ import annotations

import platform
import time
from importlib import metadata

import torch


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an input error."""
    from qcbdefense.errors import InputError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def environment() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "qcbdefense": version("qcbdefense"),
        "torch": torch.__version__,
        "brevitas": version("brevitas"),
        "onnxruntime": version("onnxruntime"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
