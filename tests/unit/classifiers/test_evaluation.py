from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_imageset
from puregen_dist.attacks.badnets import BadNetsAttack, BadNetsConfig
from puregen_dist.classifiers.evaluation import (
    aggregate_over_targets,
    natural_accuracy,
    poison_success,
    wilson_interval,
)


class PatchDetector(nn.Module):
    """Predicts class 2 when the bottom-right pixel is white, else the label encoded in the top-left pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        hit = x[:, 0, -1, -1] > 0.99
        own = (x[:, 0, 0, 0] * 255).round().long() % 4
        logits = torch.nn.functional.one_hot(torch.where(hit, torch.full_like(own, 2), own), 4).float()
        return logits + 0 * self.dummy


def labelled_data():
    data = make_imageset(n=40, size=8, channels=1, classes=4)
    images = data.images.copy()
    images[:, 0, 0, 0] = data.labels  # the "feature" the detector reads
    images[:, -1, -1, 0] = 0
    return data.replace(images=images)


def test_natural_accuracy_and_poison_success_per_source_class():
    test = labelled_data()
    model = PatchDetector()
    assert natural_accuracy(model, test) == 1.0
    target = BadNetsAttack(BadNetsConfig(target_class=2, patch_size=1, pattern="white")).trigger_spec(test.shape)
    ps = poison_success(model, test, target)
    assert ps.rate == 1.0 and ps.count == 30 and set(ps.per_source_class) == {0, 1, 3}
    other = BadNetsAttack(BadNetsConfig(target_class=1, patch_size=1, pattern="white")).trigger_spec(test.shape)
    assert poison_success(model, test, other).rate == 0.0  # the detector sends triggers to class 2, not 1


def test_aggregate_over_targets_uses_sample_std_and_max():
    agg = aggregate_over_targets([0.2, 0.4, 0.9])
    assert agg["mean"] == pytest.approx(0.5) and agg["max"] == 0.9
    assert agg["std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert aggregate_over_targets([0.3])["std"] == 0.0


def test_wilson_interval_golden_values():
    lo, hi = wilson_interval(45, 48)
    assert (round(lo, 4), round(hi, 4)) == (0.8316, 0.9785)  # by hand: centre 0.9051, half-width 0.0734
    assert wilson_interval(0, 10)[0] == 0.0
