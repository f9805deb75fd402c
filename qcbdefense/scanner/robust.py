"""Robust z-scores: how far a value stands from the others in median absolute deviations.

The scanner's per-class statistics (the anomaly index of trigger efforts, the carry index of held-out successes,
the square scan's lift) each ask which one class of ten stands out. The mean and standard deviation would be
dragged by that class itself; the median and the median absolute deviation are not. Each caller floors the
deviation at what counts as noise for its quantity, so classes that all sit together do not divide by zero.
"""

from __future__ import annotations

import torch


def robust_z(values: torch.Tensor, floor: float) -> torch.Tensor:
    """(values - median) / max(1.4826 x median absolute deviation, `floor`): the consistent estimate of the
    standard deviation for normal data, floored."""
    median = values.median()
    spread = (1.4826 * (values - median).abs().median()).clamp_min(floor)
    return (values - median) / spread
