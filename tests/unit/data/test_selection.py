"""Seeded stratified subsets and splits: counts, determinism, id preservation."""

from __future__ import annotations

import numpy as np
import pytest

from puregen_dist.data.selection import stratified_split, stratified_subset
from puregen_dist.types import ImageSet


def _imbalanced(sizes: tuple[int, ...] = (40, 13, 2, 7), seed: int = 0) -> ImageSet:
    """Classes of the given sizes, rows shuffled, ids 1000 + 3k (neither positions nor sorted)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    order = rng.permutation(len(labels))
    n = len(labels)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    ids = (1000 + 3 * np.arange(n)).astype(np.int64)[order]
    return ImageSet(images, labels[order], ids, tuple(f"c{k}" for k in range(len(sizes))))


def _rows_match(sub: ImageSet, full: ImageSet) -> bool:
    """Every row of ``sub`` carries the same image and label as the row with its id in ``full``."""
    pos = full.positions(sub.ids)
    return bool(np.array_equal(full.images[pos], sub.images) and np.array_equal(full.labels[pos], sub.labels))


def test_subset_per_class_counts() -> None:
    data = _imbalanced()
    sub = stratified_subset(data, per_class=5, seed=0)
    assert np.bincount(sub.labels, minlength=4).tolist() == [5, 5, 2, 5]
    assert sub.classes == data.classes


def test_subset_larger_than_every_class_keeps_all() -> None:
    data = _imbalanced()
    sub = stratified_subset(data, per_class=1000, seed=3)
    assert np.array_equal(sub.ids, np.sort(data.ids))
    assert _rows_match(sub, data)


def test_subset_is_deterministic_per_seed() -> None:
    data = _imbalanced()
    first = stratified_subset(data, per_class=5, seed=7)
    second = stratified_subset(data, per_class=5, seed=7)
    assert np.array_equal(first.ids, second.ids)
    assert np.array_equal(first.images, second.images)


def test_subset_seeds_differ() -> None:
    data = _imbalanced()
    picks = {tuple(stratified_subset(data, per_class=5, seed=s).ids.tolist()) for s in range(4)}
    assert len(picks) > 1


def test_subset_preserves_ids_sorted() -> None:
    data = _imbalanced()
    sub = stratified_subset(data, per_class=5, seed=1)
    assert np.all(np.diff(sub.ids) > 0)
    assert np.isin(sub.ids, data.ids).all()
    assert _rows_match(sub, data)


def test_subset_rejects_zero() -> None:
    with pytest.raises(ValueError, match="per_class"):
        stratified_subset(_imbalanced(), per_class=0, seed=0)


def test_split_disjoint_union_sorted() -> None:
    data = _imbalanced()
    train, test = stratified_split(data, test_fraction=0.25, seed=0)
    assert not np.intersect1d(train.ids, test.ids).size
    assert np.array_equal(np.sort(np.concatenate([train.ids, test.ids])), np.sort(data.ids))
    for part in (train, test):
        assert np.all(np.diff(part.ids) > 0)
        assert _rows_match(part, data)


def test_split_per_class_counts() -> None:
    data = _imbalanced(sizes=(40, 13, 2, 7))
    train, test = stratified_split(data, test_fraction=0.25, seed=0)
    # round(40 * .25) = 10, round(13 * .25) = 3, round(2 * .25) = 0 -> at least 1, round(7 * .25) = 2
    assert np.bincount(test.labels, minlength=4).tolist() == [10, 3, 1, 2]
    assert np.bincount(train.labels, minlength=4).tolist() == [30, 10, 1, 5]


def test_split_is_deterministic_and_seeded() -> None:
    data = _imbalanced()
    a_train, a_test = stratified_split(data, 0.3, seed=5)
    b_train, b_test = stratified_split(data, 0.3, seed=5)
    assert np.array_equal(a_train.ids, b_train.ids) and np.array_equal(a_test.ids, b_test.ids)
    others = {tuple(stratified_split(data, 0.3, seed=s)[1].ids.tolist()) for s in range(4)}
    assert len(others) > 1


def test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(_imbalanced(), test_fraction=1.0, seed=0)
