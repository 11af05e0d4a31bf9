from __future__ import annotations

import numpy as np
import torch

from conftest import make_imageset
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.data.transforms import to_unit
from puregen_dist.protocols import TrainHook

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


class RecordingHook(TrainHook):
    """Keeps every epoch's first row and checks each batch's ids against its images."""

    def __init__(self, data):
        self.data, self.epochs, self.batches = data, [], 0

    def on_epoch_start(self, epoch, data, model):
        assert len(data) == len(self.data) and model.training  # each epoch starts from the full set
        self.epochs.append(epoch)
        return data.take(np.arange(len(data) - 10))  # train on a subset this epoch

    def on_batch(self, x, ids, generator):
        pos = self.data.positions(ids.numpy())
        assert torch.equal(x, to_unit(self.data.images[pos]))  # no crop or flip in this recipe
        self.batches += 1
        return x + 0.0


def test_hooks_see_every_epoch_and_batches_carry_their_ids():
    data = separable_data()
    hook = RecordingHook(data)
    cfg = ClassifierConfig(name="small_cnn", epochs=2, batch_size=16, lr=0.05, milestones=(2,), crop_padding=0,
                           flip=False)
    model = Normalized(build_classifier("small_cnn", in_channels=1, num_classes=4, image_size=8), (0.5,), (0.5,))
    result = train_classifier(model, data, cfg, seed=0, hooks=[hook])
    assert hook.epochs == [1, 2] and hook.batches == 2 * 6  # 86 rows in batches of 16
    assert [h["train_rows"] for h in result.history] == [86.0, 86.0] and len(result.trained_ids) == 86
