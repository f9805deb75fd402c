"""What a scan writes: its report and the two pictures a reader looks at first.

Kept apart from the scan itself (`scanner.scan_models` reads and writes nothing): report.json, trigger.png (the
trigger the report's `picture` holds: the suspected target's, or the square that stands out, or a scanned image
when nothing was found) and drift.png (each layer's worst-channel drift).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qcbdefense.fileio import atomic_path
from qcbdefense.scanner.drift import LayerDrift
from qcbdefense.scanner.trigger_search import stamp

if TYPE_CHECKING:  # scan.py calls this module
    from qcbdefense.scanner.scan import ScanReport


def write_scan(out: Path, report: "ScanReport", example: torch.Tensor, *, title: str) -> None:
    """report.json, trigger.png (drawn on `example`, one scanned image [3, H, W]) and drift.png (`title`) in
    `out`; the report's `files` names them."""
    out.mkdir(parents=True, exist_ok=True)
    report.files.update(trigger_png=str(out / "trigger.png"), drift_png=str(out / "drift.png"))
    picture = report.picture
    plot_trigger(out / "trigger.png", picture.mask, picture.pattern, picture.title, example.cpu(), picture.stamped)
    plot_drift(out / "drift.png", {"quantized": report.layers}, title=title, note=report.drift_pairing)
    report.save(out / "report.json")


def plot_trigger(path: Path, mask: torch.Tensor | None, pattern: torch.Tensor | None, title: str,
                 example: torch.Tensor, stamped: torch.Tensor | None = None) -> None:
    """The mask, the pattern it lets through and a stamped image (`stamped` when the trigger is not a stamp:
    additive); with no mask (nothing found), the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if mask is not None and stamped is None:
        stamped = stamp(example, mask, pattern)
    panels = ([("a scanned image, unchanged", example)] if mask is None else
              [("mask", mask), ("mask x pattern", mask * pattern), ("stamped image", stamped)])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels) if mask is not None else 5.0, 2.8),
                             squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        img = img.detach().clamp(0, 1)
        ax.imshow(img.numpy() if img.dim() == 2 else img.permute(1, 2, 0).numpy(), cmap="gray",
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_drift(path: Path, series: dict[str, list[LayerDrift]], *, title: str, note: str = "") -> None:
    """Bars of each layer's worst-channel drift, one series per quantized model (e.g. nearest, purified); `note`
    says why no layer was paired, when none was."""
    with atomic_path(path) as tmp:
        drift_figure(series, title=title, note=note).savefig(tmp, format="png", dpi=100)


def drift_figure(series: dict[str, list[LayerDrift]], *, title: str, note: str = ""):
    """The figure `plot_drift` saves; when no layer could be paired it says so (and why: `note`) instead of
    showing empty axes."""
    from matplotlib.figure import Figure

    layers = max((len(v) for v in series.values()), default=0)
    fig = Figure(figsize=(max(4.0, 0.35 * layers * len(series) + 2), 3.0))
    ax = fig.subplots()
    ax.set_title(title, fontsize=9)
    if layers == 0:
        ax.text(0.5, 0.5, "no layers paired, so only the outputs were compared (report.json: disagreement):\n"
                + textwrap.fill(note or "the two graphs do not pair", 90),
                ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.axis("off")
        fig.tight_layout()
        return fig
    width = 0.8 / max(len(series), 1)
    for k, (label, drifts) in enumerate(series.items()):
        ax.bar([d.layer + (k - (len(series) - 1) / 2) * width for d in drifts], [d.max for d in drifts],
               width=width, label=label)
    ax.set_xlabel("conv/linear layer, from the input")
    ax.set_ylabel("worst channel |q - FP| / FP std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
