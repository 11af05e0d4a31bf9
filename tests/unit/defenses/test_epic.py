"""EPIC: rounds on schedule, planted isolated points dropped, selection by id whatever the row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_imageset
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.config.errors import FieldError
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.defenses.epic import EpicConfig, EpicHook, class_budgets, select_coreset


def planted_proxies(seed=0):
    """Two classes, each three tight clusters of 30 points plus three isolated points far from everything;
    returns (proxies (186, 4), labels, positions of the isolated points)."""
    rng = np.random.default_rng(seed)
    rows, labels, isolated = [], [], []
    for label in (0, 1):
        for centre in rng.normal(size=(3, 4)) * 0.3:
            rows.append(centre + rng.normal(size=(30, 4)) * 0.01)
            labels += [label] * 30
        for _ in range(3):
            isolated.append(len(labels))
            rows.append(rng.normal(size=(1, 4)) * 0.2 + rng.choice([-8.0, 8.0], size=(1, 4)))
            labels.append(label)
    return torch.from_numpy(np.concatenate(rows)), np.asarray(labels), np.asarray(isolated)


def test_a_round_drops_planted_isolated_points_and_keeps_the_clusters():
    proxies, labels, isolated = planted_proxies()
    kept = select_coreset(proxies, labels, subset_size=0.1, cluster_thresh=1.0, rng=np.random.default_rng(0))
    assert not np.isin(isolated, kept).any()
    clustered = np.setdiff1d(np.arange(len(labels)), isolated)
    assert np.isin(clustered, kept).mean() >= 0.9


def test_class_budgets_follow_class_shares_and_sum_to_the_budget():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    for seed in range(5):  # B = 25: ceil(12.5, 7.5, 5) = (13, 8, 5), one too many, taken from a random class
        budgets = class_budgets(labels, 0.25, np.random.default_rng(seed))
        assert sum(budgets.values()) == 25
        assert [13 - budgets[0], 8 - budgets[1], 5 - budgets[2]] in ([1, 0, 0], [0, 1, 0], [0, 0, 1])


def test_rounds_run_on_schedule_with_zero_based_epoch_indices():
    hook = EpicHook(EpicConfig(subset_size=0.2, subset_freq=3, drop_after=2, stop_after=9), seed=0)
    assert [e for e in range(1, 15) if hook.due(e)] == [4, 7]  # indices 3 and 6 (2 <= i < 9, i % 3 == 0)
    defaults = EpicHook(EpicConfig(), seed=0)
    assert [e for e in range(1, 40) if defaults.due(e)] == [11, 21, 31]


def small_model(data, seed=0):
    torch.manual_seed(seed)
    net = build_classifier("small_cnn", in_channels=3, num_classes=data.num_classes, image_size=8)
    return Normalized(net, (0.5,) * 3, (0.25,) * 3)


def test_kept_rows_are_the_selected_images_whatever_the_row_order():
    data = make_imageset(n=120, size=8, classes=3, seed=1)
    model = small_model(data).eval()
    cfg = EpicConfig(subset_size=0.3, subset_freq=1, drop_after=0)
    first = EpicHook(cfg, seed=0).on_epoch_start(1, data, model)
    shuffled = data.take(np.random.default_rng(5).permutation(len(data)))
    second = EpicHook(cfg, seed=0).on_epoch_start(1, shuffled, model)
    assert 0 < len(first) < len(data)
    assert set(first.ids) == set(second.ids)
    for subset in (first, second):  # every kept row carries its own image and label
        pos = data.positions(subset.ids)
        assert np.array_equal(subset.images, data.images[pos]) and np.array_equal(subset.labels, data.labels[pos])


def test_the_kept_set_only_shrinks_and_training_uses_it():
    data = make_imageset(n=120, size=8, classes=3, seed=2)
    cfg = ClassifierConfig(name="small_cnn", epochs=5, batch_size=32, lr=0.05, milestones=(4,), crop_padding=1)
    hook = EpicHook(EpicConfig(subset_size=0.2, subset_freq=2, drop_after=1), seed=0)
    result = train_classifier(small_model(data), data, cfg, seed=0, hooks=[hook])
    kept = [r["kept"] for r in hook.rounds]
    assert [r["epoch"] for r in hook.rounds] == [3.0, 5.0] and kept == sorted(kept, reverse=True)
    rows = [h["train_rows"] for h in result.history]
    assert rows[:2] == [120.0, 120.0] and rows[2] == kept[0] and rows[4] == kept[1]
    assert set(result.trained_ids) == set(hook.kept_ids)


@pytest.mark.parametrize(("key", "value"), [("subset_size", 1.0), ("subset_freq", 0), ("stop_after", 10),
                                            ("cluster_thresh", float("inf"))])
def test_config_refuses_bad_values(key, value):
    with pytest.raises(FieldError, match=key):
        EpicConfig(**{key: value})


@pytest.mark.parametrize(("defense", "key"), [({"name": "epic"}, "defense.drop_after"),
                                              ({"name": "friends_b"}, "defense.begin_epoch")])
def test_a_schedule_that_never_acts_is_refused_before_any_compute(defense, key):
    from puregen_dist.config.errors import ConfigError
    from puregen_dist.config.loading import build
    from puregen_dist.config.schema import ExperimentConfig

    with pytest.raises(ConfigError, match=f"{key}: must be < classifier.epochs \\(5\\)"):
        build(ExperimentConfig, {"defense": defense, "classifier": {"epochs": 5}}, source="run.yaml")
    build(ExperimentConfig, {"defense": defense, "classifier": {"epochs": 11}}, source="run.yaml")
