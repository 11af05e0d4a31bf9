"""EPIC, a training-time defense: iteratively drop the training points that are isolated in gradient space.

Paper: "Not All Poisons are Created Equal: Robust Training against Data Poisoning" (Yang, Liu, Mirzasoleiman;
ICML 2022), https://arxiv.org/abs/2210.09671; code: YuYang0901/EPIC. PureGen compares against EPIC-0.1/0.2/0.3
(PUREGEN_REFERENCE §4.3).

Every ``subset_freq`` epochs from ``drop_after`` until ``stop_after`` (0-based epoch indices, as in the
original), a round:

1. one un-augmented, unshuffled pass of the model (eval mode) over the whole training set gives each sample's
   gradient proxy ``g = softmax(W phi(x)) - onehot(y)`` (phi the penultimate features, W the head's weight);
2. per class, greedy facility location on ``exp(-||g_i - g_j|| / K)`` picks that class's share of
   ``B = subset_size * N`` medoids (``ceil(n_c / N * B)``, the excess taken one at a time from distinct,
   randomly drawn classes); every sample joins its most similar medoid, a medoid's weight is its cluster size;
3. clusters of weight <= ``cluster_thresh`` (isolated points: the poisons EPIC looks for) are dropped; every
   sample of a kept cluster is kept;
4. a sample stays in training only while every round keeps it (the original's ``times_selected == epoch``):
   the kept set only shrinks.

Between rounds the classifier trains on the kept samples, with fresh augmentation every epoch. Selection is by
sample id, so the kept rows are the right images whatever order the training loop draws them in.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from puregen_dist.classifiers.features import gradient_proxies, head_of
from puregen_dist.config.errors import check
from puregen_dist.config.identity import PipelineKind, execution_only
from puregen_dist.config.schema import DefenseConfig
from puregen_dist.defenses.facility_location import euclidean_similarity, greedy_facility_location
from puregen_dist.defenses.training_time import TrainingTimeDefense, epoch_index
from puregen_dist.protocols import TrainHook
from puregen_dist.registry import DEFENSES
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EpicConfig(DefenseConfig):
    """EPIC parameters (defaults: PureGen's runs of EPIC, PUREGEN_REFERENCE §4.3)."""

    pipeline: ClassVar[PipelineKind] = "none"
    removes_rows: ClassVar[bool] = True
    name: str = "epic"
    subset_size: float = 0.1
    """Medoid budget as a fraction of the training set (EPIC-0.1 / 0.2 / 0.3), in (0, 1)."""
    subset_freq: int = 10
    """A round every this many epochs (10 from scratch; 5 for the HLB ResNet-18; 1 for transfer)."""
    drop_after: int = 10
    """First epoch index (0-based) at which a round may run (10; 5 / 1 / 0 in PureGen's other settings)."""
    stop_after: int = 200
    """Rounds run at epoch indices below this."""
    cluster_thresh: float = 1.0
    """Clusters whose weight (size) is at most this are dropped (1: drop singletons)."""
    batch_size: int = execution_only(512)
    """Batch size of the gradient-proxy pass (does not change the selection)."""

    def __post_init__(self) -> None:
        check(0.0 < self.subset_size < 1.0, "subset_size", "must lie in (0, 1) (EPIC-0.1 / 0.2 / 0.3)")
        check(self.subset_freq >= 1, "subset_freq", "must be >= 1 epoch")
        check(self.drop_after >= 0, "drop_after", "must be >= 0 (a 0-based epoch index)")
        check(self.stop_after > self.drop_after, "stop_after", "must be > drop_after")
        check(math.isfinite(self.cluster_thresh) and self.cluster_thresh >= 0, "cluster_thresh",
              "must be a finite cluster size >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")

    def check_epochs(self, epochs: int) -> None:
        check(self.drop_after < epochs, "defense.drop_after",
              f"must be < classifier.epochs ({epochs}): it is a 0-based epoch index, and no EPIC round would run")


def class_budgets(labels: np.ndarray, subset_size: float, rng: np.random.Generator) -> dict[int, int]:
    """Medoids per class: ``ceil(n_c / N * B)`` with ``B = int(subset_size * N)``; the excess over B is taken
    back one medoid at a time from distinct classes drawn at random (EPIC's ``equal_num = False``)."""
    classes, counts = np.unique(labels, return_counts=True)
    total = int(subset_size * len(labels))
    budgets = np.minimum(np.ceil(counts / len(labels) * total).astype(int), counts)
    excess = int(budgets.sum()) - total
    if excess > 0:
        shrinkable = np.flatnonzero(budgets > 1)
        take = rng.choice(shrinkable, size=min(excess, len(shrinkable)), replace=False)
        budgets[take] -= 1
    return {int(c): max(int(b), 1) for c, b in zip(classes, budgets, strict=True)}


def select_coreset(proxies: torch.Tensor, labels: np.ndarray, subset_size: float, cluster_thresh: float,
                   rng: np.random.Generator) -> np.ndarray:
    """One EPIC round on (N, K) gradient proxies: positions (sorted) of the samples in kept clusters."""
    kept = []
    for label, budget in class_budgets(labels, subset_size, rng).items():
        members = np.flatnonzero(labels == label)
        medoids = greedy_facility_location(euclidean_similarity(proxies[members]), budget)
        dense = torch.nonzero(medoids.weights > cluster_thresh).flatten()
        kept.append(members[torch.isin(medoids.assignment, dense).cpu().numpy()])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


class EpicHook(TrainHook):
    """Runs EPIC's rounds and trains each epoch on the samples every round so far has kept."""

    def __init__(self, cfg: EpicConfig, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.kept_ids: np.ndarray | None = None
        """Ids still in training (None: all, before the first round)."""
        self.rounds: list[dict[str, float]] = []

    def due(self, epoch: int) -> bool:
        """Whether a round runs before epoch ``epoch`` (1-based)."""
        index = epoch_index(epoch)
        return (self.cfg.drop_after <= index < self.cfg.stop_after
                and index % self.cfg.subset_freq == 0)

    def on_epoch_start(self, epoch: int, data: ImageSet, model: nn.Module) -> ImageSet:
        if self.due(epoch):
            self.run_round(epoch, data, model)
        if self.kept_ids is None:
            return data
        return data.take(np.flatnonzero(np.isin(data.ids, self.kept_ids)))

    def run_round(self, epoch: int, data: ImageSet, model: nn.Module) -> None:
        """Select on ``data`` (the full training set) and intersect with what earlier rounds kept. The pass runs
        over the rows sorted by id, so the selection does not depend on the order the rows come in."""
        tick = time.perf_counter()
        data = data.take(np.argsort(data.ids, kind="stable"))
        proxies = gradient_proxies(model, data.images, data.labels, self.cfg.batch_size)
        proxies = proxies.to(head_of(model).weight.device)
        selected = data.ids[select_coreset(proxies, data.labels, self.cfg.subset_size, self.cfg.cluster_thresh,
                                           self.rng)]
        kept = selected if self.kept_ids is None else np.intersect1d(self.kept_ids, selected)
        if len(kept) == 0:  # every point dropped: the original's fallback, a random subset of size B
            size = max(int(self.cfg.subset_size * len(data)), 1)
            kept = np.sort(self.rng.choice(data.ids, size=size, replace=False))
            log.warning("EPIC round at epoch %d kept no sample; training on a random %d", epoch, size)
        self.kept_ids = kept
        seconds = time.perf_counter() - tick
        self.rounds.append({"epoch": float(epoch), "selected": float(len(selected)), "kept": float(len(kept)),
                            "seconds": seconds})
        log.info("EPIC round at epoch %d: %d of %d samples in dense clusters, %d kept (%.1fs)", epoch,
                 len(selected), len(data), len(kept), seconds)

    def summary(self) -> dict[str, float]:
        return {"epic_rounds": float(len(self.rounds)),
                "defense_seconds": float(sum(r["seconds"] for r in self.rounds))}


class Epic(TrainingTimeDefense):
    """TrainingDefense: EPIC."""

    def hooks(self, *, seed: int) -> list[TrainHook]:
        return [EpicHook(self.cfg, seed)]


@DEFENSES.register("epic", EpicConfig)
def build_epic(cfg: EpicConfig) -> Epic:
    return Epic(cfg)
