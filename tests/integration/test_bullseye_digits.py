"""Bullseye Polytope end to end on the embedded digits data in the linear-transfer protocol (issue 11): the
victim's backbone is pretrained on one half of digits (the source split) and retrains only its linear head on a
50-per-class transfer set from the other half, where all 50 images of the poison class (8, 10% of the set, as in PureGen's linear-transfer rows) carry Bullseye
perturbations; the target is a held-out test image of the target class (6).

White-box, as the Toxic benchmark's Bullseye setting and PureGen's BP-Bench rows (the substitute is the
victim's pretrained backbone). Grey-box on digits (three substitutes of the same architecture, other seeds) the
poisons' mean reaches distance ratio 0.17 on the substitutes but only 0.29 on the victim and flips no target
(measured, docs/attacks.md): 16-pixel digits features do not transfer between seeds as CIFAR-10 features do.

Golden keys 0, 2 and 4 (three trials keep the suite's time): each flips, and the same targets do not flip
after a clean transfer set. Over poison keys 0-5 with two threads, 4 of 6 flip (all but keys 3 and 5; the
distance ratio falls from about 0.62 to 0.09-0.13 in 800 iterations); with one thread (other float rounding,
another backbone) key 5 flips too. Each trial takes about 12 s on two threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from puregen_dist.attacks.bullseye import BullseyeAttack, BullseyeConfig
from puregen_dist.classifiers.evaluation import target_outcome
from puregen_dist.classifiers.training import train_classifier
from puregen_dist.config.generative import ClassifierJob
from puregen_dist.config.loading import build
from puregen_dist.config.schema import DataConfig, ExperimentConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.experiment import build_model
from puregen_dist.jobs import train_classifier_job
from puregen_dist.tracking.base import NullTracker

THREADS = 2  # fixed, not the machine's core count: the golden keys hold for these numbers
SOURCE = {"dataset": "digits", "train_partitions": 2, "train_partition": 1}
TRANSFER = {"dataset": "digits", "train_partitions": 2, "train_partition": 0, "train_per_class": 50}
BACKBONE = {"name": "small_cnn", "epochs": 15, "batch_size": 64, "lr": 0.05, "milestones": [10],
            "crop_padding": 1, "flip": False, "threads": THREADS}
KEYS = (0, 2, 4)  # golden keys (measured 2026-12-02, see the docstring)
EPS = 0.15


def _pretrain(root, name: str, seed: int, dropout: float = 0.0) -> str:
    job = build(ClassifierJob, {"output": str(root / name), "data": SOURCE, "seed": seed,
                                "classifier": {**BACKBONE, "dropout": dropout}}, source="test")
    return str(train_classifier_job(job, NullTracker()))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    torch.set_num_threads(THREADS)  # crafting runs on the global pool
    return _pretrain(tmp_path_factory.mktemp("bullseye"), "victim", 7)


def _linear_transfer(backbone: str, data):
    cfg = build(ExperimentConfig, {"data": TRANSFER, "seed": 0, "classifier": {
        "name": "small_cnn", "transfer": "linear", "pretrained": backbone, "optimizer": "adam", "lr": 0.01,
        "epochs": 20, "milestones": [10, 15], "batch_size": 64, "weight_decay": 5e-4, "crop_padding": 0,
        "flip": False, "threads": THREADS}}, source="test")
    model = build_model(cfg, data)
    train_classifier(model, data, cfg.classifier, seed=0)
    return model.eval()


def test_bullseye_flips_the_target_under_linear_transfer_on_digits(backbone):
    train, test = load_data(DataConfig(**TRANSFER))
    clean_model = _linear_transfer(backbone, train)
    flipped, by_chance, ratios = 0, 0, []
    for key in KEYS:
        cfg = BullseyeConfig(substitutes=(backbone,), poison_key=key, num_poisons=50, iterations=800, eps=EPS, device="cpu")
        poison = BullseyeAttack(cfg).craft(train, seed=0, test=test)
        assert np.all(poison.poison_labels == 8) and poison.target.adversarial_label == 8
        before, after = poison.meta["distance_before"], poison.meta["distance_after"]
        ratios.append(f"{before:.2f}->{after:.2f}")
        assert after < 0.5 * before, (key, before, after)  # the poisons' mean feature moved onto the target
        model = _linear_transfer(backbone, poison.materialize())
        flipped += int(target_outcome(model, test, poison.target).success)
        by_chance += int(target_outcome(clean_model, test, poison.target).success)
    print(f"Bullseye linear transfer on digits: {flipped}/{len(KEYS)} targets flipped to the poison class "
          f"(clean transfer set: {by_chance}/{len(KEYS)}); feature distance ratio before->after: {ratios}")
    assert flipped == len(KEYS) and by_chance == 0
