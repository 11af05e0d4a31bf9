"""What every training-time defense (FRIENDS, EPIC) shares: it leaves the training set as it is before training
(``apply`` is the identity, so the pipeline stores no purified set: ``pipeline = "none"``) and acts through the
hooks it gives the training loop (:class:`~puregen_dist.protocols.TrainHook`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from puregen_dist.protocols import TrainHook
from puregen_dist.tracking.names import Metric
from puregen_dist.types import ImageSet


class TrainingTimeDefense:
    """Base of a TrainingDefense: ``hooks(seed=...)`` builds fresh per-run hooks from ``self.cfg``."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Works on any image set."""

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        """The training set unchanged: the defense acts during training."""
        return train

    def hooks(self, *, seed: int) -> Sequence[TrainHook]:
        raise NotImplementedError


def epoch_index(epoch: int) -> int:
    """The originals' 0-based epoch index of the training loop's 1-based ``epoch`` (their schedules, e.g.
    FRIENDS' ``friendly_begin_epoch = 5`` or EPIC's ``drop_after = 10``, count epochs from 0)."""
    return epoch - 1


def removal_metrics(all_ids: np.ndarray, kept_ids: np.ndarray, poison_ids: np.ndarray) -> dict[str, float]:
    """How well a defense that removes training rows removed the poisons: ``rows_removed``, ``poisons_removed``,
    ``removal_precision`` (share of removed rows that are poisons; 0 when none removed) and ``removal_recall``
    (share of poisons removed; 1 when there are none)."""
    removed = np.setdiff1d(all_ids, kept_ids)
    hits = int(np.isin(removed, poison_ids).sum())
    return {Metric.ROWS_REMOVED: float(len(removed)), "poisons_removed": float(hits),
            Metric.REMOVAL_PRECISION: hits / len(removed) if len(removed) else 0.0,
            Metric.REMOVAL_RECALL: hits / len(poison_ids) if len(poison_ids) else 1.0}
