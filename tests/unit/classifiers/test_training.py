from __future__ import annotations

import numpy as np
import torch

from conftest import make_imageset
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.config.schema import ClassifierConfig

CFG = ClassifierConfig(name="small_cnn", epochs=3, batch_size=16, lr=0.05, milestones=(2,), crop_padding=1)


def separable_data():
    """Class c has mean brightness 40 + 60c: learnable in a few epochs."""
    data = make_imageset(n=96, size=8, channels=1, classes=4)
    rng = np.random.default_rng(1)
    images = (40 + 60 * data.labels[:, None, None, None] + rng.integers(0, 20, data.images.shape)).astype(np.uint8)
    return data.replace(images=images)


def trained(seed=0):
    torch.manual_seed(seed)
    model = Normalized(build_classifier("small_cnn", in_channels=1, num_classes=4, image_size=8), (0.5,), (0.5,))
    return train_classifier(model, separable_data(), CFG, seed=seed)


def test_training_is_deterministic_on_cpu_and_learns():
    a, b = trained(), trained()
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert len(a.history) == 3 and a.history[-1]["lr"] == CFG.lr * CFG.gamma  # MultiStepLR at epoch 2


def test_epoch_callback_and_report_receive_every_epoch():
    seen = []
    model = Normalized(build_classifier("small_cnn", in_channels=1, num_classes=4, image_size=8), (0.5,), (0.5,))
    result = train_classifier(model, separable_data(), CFG, seed=0, on_epoch_end=lambda e, m: {"probe": float(e)},
                              report=lambda metrics, step: seen.append((step, metrics["probe"])))
    assert seen == [(1, 1.0), (2, 2.0), (3, 3.0)] and result.history[2]["probe"] == 3.0
