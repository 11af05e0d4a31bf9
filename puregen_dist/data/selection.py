"""Seeded, stratified selection of rows from an :class:`ImageSet` (pure numpy).

Selections keep ids and return rows sorted by id, so the same (data, seed) always gives the same rows in the
same order.
"""

from __future__ import annotations

import numpy as np

from puregen_dist.types import ImageSet


def _class_rows(labels: np.ndarray) -> list[np.ndarray]:
    """Positional indices of each present class, classes in increasing label order; labels: (N,) int64."""
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def _sorted_by_id(data: ImageSet, rows: np.ndarray) -> ImageSet:
    """The rows at positional ``rows`` ((K,) int), reordered by increasing id."""
    rows = np.asarray(rows, dtype=np.int64)
    return data.take(rows[np.argsort(data.ids[rows], kind="stable")])


def stratified_subset(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """At most ``per_class`` rows of each class, drawn with ``np.random.default_rng(seed)``.

    Args:
        data: N images (N, H, W, C) with labels and ids.
        per_class: the most rows kept per class (>= 1); smaller classes are kept whole.
        seed: the selection seed.

    Returns:
        An ImageSet of sum_c min(n_c, per_class) rows, ids preserved, sorted by id.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(rows)[:per_class] for rows in _class_rows(data.labels)]
    return _sorted_by_id(data, np.concatenate(picked) if picked else np.empty(0, np.int64))


def _test_count(n: int, test_fraction: float) -> int:
    """Rows of an n-row class held out: round(n * test_fraction), at least 1, leaving >= 1 row when n >= 2."""
    count = max(1, int(round(n * test_fraction)))
    return min(count, n - 1) if n >= 2 else count


def stratified_split(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split ``data`` per class into (train, test), seeded with ``np.random.default_rng(seed)``.

    Each class of n_c rows contributes round(n_c * test_fraction) rows to test (at least 1, and at most
    n_c - 1 when n_c >= 2 so that train keeps the class too).

    Args:
        data: N images (N, H, W, C) with labels and ids.
        test_fraction: fraction of each class held out, in (0, 1).
        seed: the split seed.

    Returns:
        (train, test): disjoint ImageSets whose union is ``data``, each sorted by id, ids preserved.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for rows in _class_rows(data.labels):
        shuffled = rng.permutation(rows)
        count = _test_count(len(rows), test_fraction)
        test_rows.append(shuffled[:count])
        train_rows.append(shuffled[count:])
    empty = np.empty(0, np.int64)
    train = _sorted_by_id(data, np.concatenate(train_rows) if train_rows else empty)
    test = _sorted_by_id(data, np.concatenate(test_rows) if test_rows else empty)
    return train, test


def stratified_partition(data: ImageSet, parts: int, index: int, seed: int) -> ImageSet:
    """Part ``index`` of ``parts`` disjoint, class-balanced parts of ``data`` (seeded).

    Each class is shuffled with ``np.random.default_rng(seed)`` and cut into ``parts`` near-equal slices; the
    parts are disjoint and together cover ``data``. Used to train generative models on data disjoint from the
    classifier's (e.g. ``train_partition: 1`` for the EBM, ``0`` for the classifier).

    Returns:
        An ImageSet (ids preserved, sorted by id).
    """
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"need parts >= 1 and 0 <= index < parts, got parts={parts}, index={index}")
    rng = np.random.default_rng(seed)
    picked = [np.array_split(rng.permutation(rows), parts)[index] for rows in _class_rows(data.labels)]
    return _sorted_by_id(data, np.concatenate(picked) if picked else np.empty(0, np.int64))
