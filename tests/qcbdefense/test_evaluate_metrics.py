"""RA and DER against hand-checked examples."""

import pytest
import torch
from torch import nn

from qcbdefense.scoring import defense_effectiveness_rating, triggered_scores

class _ByCorner(nn.Module):
    """Predicts class 0 when the top-left pixel is bright, else the class written in pixel (0, 1, 1)."""

    def forward(self, x):
        own = (x[:, 0, 1, 1] * 255).round().long()
        return nn.functional.one_hot(torch.where(x[:, 0, 0, 0] > 0.5, 0, own), 4).float()

class _Corner:
    def apply(self, x):
        x = x.clone()
        x[..., 0, 0] = 1.0
        return x

def test_ra_counts_triggered_images_kept_on_their_class():
    x = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    y = torch.tensor([1, 2, 3, 0])
    x[:, 0, 1, 1] = y.to(torch.uint8)
    # every non-target image goes to the target under this trigger: ASR 100, RA 0
    asr, ra, n = triggered_scores(_ByCorner(), x, y, _Corner(), 0)
    assert (asr, ra, n) == (100.0, 0.0, 3)

def test_der_hand_checked():
    # ASR 98 -> 2 (drop 96 points), CA 85 -> 84 (drop 1): (0.96 - 0.01 + 1) / 2 = 97.5
    assert defense_effectiveness_rating(85.0, 98.0, 84.0, 2.0) == pytest.approx(97.5)
    # nothing changed: 50; gains are not rewarded beyond zero drop
    assert defense_effectiveness_rating(85.0, 98.0, 85.0, 98.0) == pytest.approx(50.0)
    assert defense_effectiveness_rating(85.0, 2.0, 86.0, 5.0) == pytest.approx(50.0)
