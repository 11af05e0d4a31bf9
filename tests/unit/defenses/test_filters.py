"""Spectral Signatures and Activation Clustering: their scores and clusters, and that both catch most of a
dirty-label patch poison on digits; the detector cached by key in the artifact store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DIGITS_CNN_RECIPE, make_imageset
from puregen_dist.config.errors import FieldError
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.defenses import build_defense
from puregen_dist.defenses.activation_clustering import ActivationClusteringConfig, kmeans, reduce_dims
from puregen_dist.defenses.spectral import SpectralSignaturesConfig, spectral_scores
from puregen_dist.defenses.training_time import removal_metrics

DETECTOR = ClassifierConfig(**DIGITS_CNN_RECIPE)


def test_spectral_scores_rank_planted_outliers_first():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(200, 16))
    shifted = rng.normal(size=(20, 16)) + 8.0 * np.eye(16)[3]  # a cluster displaced along one direction
    scores = spectral_scores(torch.from_numpy(np.concatenate([clean, shifted])))
    assert set(torch.topk(scores, 20).indices.tolist()) == set(range(200, 220))
    assert torch.allclose(spectral_scores(torch.from_numpy(np.concatenate([clean, shifted])) + 5.0), scores)


def test_kmeans_separates_two_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    points = torch.from_numpy(np.concatenate([rng.normal(size=(60, 3)), rng.normal(size=(25, 3)) + 6]))
    run = [kmeans(points, 2, n_init=3, max_iter=100, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(run[0], run[1])
    assert len(set(run[0][:60].tolist())) == 1 and len(set(run[0][60:].tolist())) == 1 and run[0][0] != run[0][-1]
    assert reduce_dims(points, 10, whiten=False).shape == (85, 3)  # at most the feature dimension


def test_removal_metrics():
    metrics = removal_metrics(np.arange(10), np.array([0, 1, 2, 3, 4, 5, 6]), np.array([6, 7, 8, 9]))
    assert metrics == {"rows_removed": 3.0, "poisons_removed": 3.0, "removal_precision": 1.0,
                       "removal_recall": 0.75}


@pytest.mark.parametrize(("cfg", "min_recall", "max_removed"), [
    # epsilon 0.33: a third of the target class is poisoned; 1.5 epsilon of every class goes (measured 1.0)
    (SpectralSignaturesConfig(poison_fraction=0.33, detector=DETECTOR), 0.95, 0.55),
    # the poisoned class splits into its poisons and its clean rows (measured 1.0, nothing else removed)
    (ActivationClusteringConfig(detector=DETECTOR), 0.9, 0.15),
])
def test_filters_catch_most_of_a_dirty_label_patch_poison(cfg, min_recall, max_removed, digits_patch_poison,
                                                          digits_detector):
    data, poison_ids = digits_patch_poison
    defense = build_defense(cfg)
    flags = defense.flagged(data, digits_detector, seed=0)
    metrics = removal_metrics(data.ids, data.ids[~flags], poison_ids)
    assert metrics["removal_recall"] >= min_recall
    assert metrics["rows_removed"] <= max_removed * len(data)
    kept = defense.apply(data, seed=0)  # apply = train the detector (same recipe and seed) + flag
    assert np.array_equal(kept.ids, data.ids[~flags])
    assert np.array_equal(kept.images, data.images[~flags]) and np.array_equal(kept.labels, data.labels[~flags])


def test_the_detector_is_trained_once_per_key_and_shared(tmp_path):
    from puregen_dist.pipeline.filters import cached_detector
    from puregen_dist.pipeline.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    data = make_imageset(n=40, size=8, channels=1, classes=4)
    tiny = ClassifierConfig(name="small_cnn", epochs=1, batch_size=16, milestones=(1,), threads=1)
    spectral = build_defense(SpectralSignaturesConfig(detector=tiny))
    clustering = build_defense(ActivationClusteringConfig(detector=tiny))
    first, key, trained = cached_detector(store, spectral, 0, "poison-0123456789abcdef", data)
    again, same_key, retrained = cached_detector(store, clustering, 0, "poison-0123456789abcdef", data)
    assert trained and not retrained and key == same_key and store.exists(key)
    assert np.array_equal(spectral.flagged(data, first, seed=0), spectral.flagged(data, again, seed=0))
    other = cached_detector(store, spectral, 1, "poison-0123456789abcdef", data)
    assert other[1] != key and other[2]


@pytest.mark.parametrize(("cls", "key", "value"), [
    (SpectralSignaturesConfig, "poison_fraction", 1.0), (SpectralSignaturesConfig, "removal_factor", 0.0),
    (ActivationClusteringConfig, "nb_clusters", 1), (ActivationClusteringConfig, "size_threshold", 1.0),
])
def test_configs_refuse_bad_values(cls, key, value):
    with pytest.raises(FieldError, match=key):
        cls(**{key: value})


def test_a_transfer_detector_is_refused():
    with pytest.raises(FieldError, match="detector.transfer"):
        SpectralSignaturesConfig(detector=ClassifierConfig(transfer="linear", pretrained="x"))


def test_a_filter_that_removes_nothing_still_logs_its_removal():
    """Recall 0 of a filter that kept every row is a result too (it is what a report's removal table shows)."""
    from puregen_dist.config.loading import build
    from puregen_dist.config.schema import ExperimentConfig
    from puregen_dist.experiment import run_experiment
    from puregen_dist.tracking.base import NullTracker

    tiny = {"name": "small_cnn", "epochs": 1, "batch_size": 32, "threads": 1}
    cfg = build(ExperimentConfig, {
        "data": {"dataset": "digits", "train_per_class": 20},
        "attack": {"name": "badnets", "target_class": 0, "budget": 0.05},
        "defense": {"name": "spectral_signatures", "poison_fraction": 0.001, "detector": tiny},
        "classifier": tiny, "tracking": {"enabled": False}}, source="test")
    costs = run_experiment(cfg, NullTracker()).costs
    assert costs["rows_removed"] == 0 and costs["removal_recall"] == 0 and costs["removal_precision"] == 0
