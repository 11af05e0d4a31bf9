"""Triggerless success of one trial (issue 11, DESIGN §6): the target image(s) classified as the adversarial label,
and as their true label; from imported target images or from test-set ids; and through a whole `run`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_imageset
from puregen_dist.classifiers.evaluation import target_outcome
from puregen_dist.types import TargetSpec


class ByMeanBrightness(nn.Module):
    """Class 1 for bright images (mean > 0.5), else class 0: a classifier whose answers the test knows."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0.5).float()
        return torch.stack([1 - bright, bright], dim=1)


def test_target_images_count_as_success_when_classified_as_the_adversarial_label():
    test = make_imageset(n=8, size=4, classes=2)
    bright, dark = np.full((1, 4, 4, 3), 230, np.uint8), np.full((1, 4, 4, 3), 20, np.uint8)
    hit = target_outcome(ByMeanBrightness(), test, TargetSpec("triggerless", target_images=bright,
                                                              target_labels=np.array([0]), adversarial_label=1))
    assert (hit.success, hit.correct, hit.predictions.tolist()) == (1.0, 0.0, [1])
    miss = target_outcome(ByMeanBrightness(), test, TargetSpec("triggerless", target_images=dark,
                                                               target_labels=np.array([0]), adversarial_label=1))
    assert (miss.success, miss.correct) == (0.0, 1.0)


def test_target_ids_are_read_from_the_test_set():
    test = make_imageset(n=8, size=4, classes=2)
    test.images[3] = 255  # id 103: bright, true label 1
    outcome = target_outcome(ByMeanBrightness(), test, TargetSpec("triggerless", target_ids=np.array([103]),
                                                                  adversarial_label=0))
    assert (outcome.success, outcome.correct) == (0.0, 1.0)
    with pytest.raises(ValueError, match="adversarial_label"):
        target_outcome(ByMeanBrightness(), test, TargetSpec("triggerless", target_ids=np.array([103])))


def test_a_run_with_an_imported_triggerless_trial_reports_target_success(tmp_path):
    from published_poisons import write_toxic

    from puregen_dist.config.loading import build
    from puregen_dist.config.schema import DataConfig, ExperimentConfig
    from puregen_dist.data.datasets import load_data
    from puregen_dist.experiment import execute, prepare_experiment, summary_line
    from puregen_dist.tracking.base import NullTracker

    data = {"dataset": "digits", "train_per_class": 10, "test_per_class": 5}
    train, _ = load_data(DataConfig(**data))
    write_toxic(tmp_path / "trial", train, train.ids[train.labels == 2][:3])
    cfg = build(ExperimentConfig, {"data": data, "attack": {"name": "toxic", "path": str(tmp_path / "trial")},
                                   "classifier": {"name": "small_cnn", "epochs": 1, "batch_size": 32, "threads": 1,
                                                  "crop_padding": 1, "flip": False}}, source="test")
    metrics = execute(prepare_experiment(cfg), NullTracker())
    logged = metrics.as_dict()
    assert logged["target_success"] in (0.0, 1.0) and logged["target_correct"] in (0.0, 1.0)
    assert metrics.target.predictions.shape == (1,) and "target_success=" in summary_line(cfg, metrics)
