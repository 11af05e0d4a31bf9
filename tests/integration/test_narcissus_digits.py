"""Narcissus end to end on the embedded digits data (issue 10): a surrogate trained on POOD (the other half of
digits without the target class) plus the target class, the trigger crafted on it, 5% of the victim's training
half poisoned with labels unchanged; a small CNN trained on the poisoned set sends most triggered non-target test
images (m = 3) to the target class, far more than the same triggered images go there under a model trained on
the clean set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from puregen_dist.attacks.narcissus import NarcissusAttack, NarcissusConfig
from puregen_dist.classifiers.evaluation import poison_success
from puregen_dist.classifiers.training import train_classifier
from puregen_dist.config.generative import SurrogateJob
from puregen_dist.config.loading import build
from puregen_dist.config.schema import DataConfig, ExperimentConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.experiment import build_model
from puregen_dist.jobs import train_surrogate_job
from puregen_dist.tracking.base import NullTracker

VICTIM = DataConfig(dataset="digits", train_partitions=2, train_partition=0)
POOD = DataConfig(dataset="digits", train_partitions=2, train_partition=1)
THREADS = 2  # fixed, not the machine's core count: the same numbers on every machine
CLASSIFIER = {"name": "small_cnn", "epochs": 15, "batch_size": 64, "lr": 0.05, "milestones": [10],
              "crop_padding": 1, "flip": False, "threads": THREADS}


@pytest.fixture(scope="module")
def surrogate_dir(tmp_path_factory):
    job = build(SurrogateJob, {
        "output": str(tmp_path_factory.mktemp("surrogate")), "data": {"dataset": "digits", "train_partitions": 2},
        "pood": {"dataset": "digits", "train_partitions": 2, "train_partition": 1}, "pood_drop_classes": [0],
        "target_classes": [0], "classifier": {**CLASSIFIER, "epochs": 30, "schedule": "cosine"}}, source="test")
    return train_surrogate_job(job, NullTracker())


def _train(data, seed: int = 0):
    cfg = build(ExperimentConfig, {"data": {"dataset": "digits", "train_partitions": 2}, "seed": seed,
                                   "classifier": CLASSIFIER}, source="test")
    torch.set_num_threads(THREADS)
    model = build_model(cfg, data)
    train_classifier(model, data, cfg.classifier, seed=seed)
    return model


def test_narcissus_backdoors_an_undefended_classifier_on_digits(surrogate_dir):
    torch.set_num_threads(THREADS)  # crafting runs on the global pool
    train, test = load_data(VICTIM)
    cfg = NarcissusConfig(surrogate=str(surrogate_dir), target_class=0, eps=32 / 255, budget=0.05, rounds=1000,
                          crop_padding=1, flip=False, device="cpu")
    poison = NarcissusAttack(cfg).craft(train, seed=0)
    assert len(poison.poison_ids) == 34 and np.all(poison.poison_labels == 0)  # clean label, 5% of 675
    delta = np.abs(poison.poisoned.astype(int) - train.images[train.positions(poison.poison_ids)].astype(int))
    assert delta.max() <= 32
    poisoned_model = _train(poison.materialize())
    clean_model = _train(train)
    backdoor = poison_success(poisoned_model, test, poison.target, 3.0, 512).rate
    by_chance = poison_success(clean_model, test, poison.target, 3.0, 512).rate
    print(f"Narcissus m=3 poison success: poisoned model {backdoor:.3f}, clean model {by_chance:.3f}")
    assert backdoor >= 0.5 and by_chance <= 0.25 and backdoor >= by_chance + 0.4
