"""What the training-set filters (Spectral Signatures, Activation Clustering) share: a detector classifier is
trained on the (possibly poisoned) training set, its penultimate representations of every training image are
scored per class, and the flagged rows are removed before the real classifier trains.

The pipeline runs a filter as one task over the whole set (``pipeline = "whole_set"``) and caches the detector
by (poison set, detector recipe, seed), so filters that share a detector recipe train it once
(:func:`~puregen_dist.pipeline.stages.purify_stage`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.features import features_and_logits
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.config.errors import UserInputError, check
from puregen_dist.config.identity import PipelineKind
from puregen_dist.config.schema import ClassifierConfig, DefenseConfig
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FilterConfig(DefenseConfig):
    """Base of the training-set filters: the detector they train on the poisoned set."""

    pipeline: ClassVar[PipelineKind] = "whole_set"
    removes_rows: ClassVar[bool] = True
    detector: ClassifierConfig = field(default_factory=ClassifierConfig)
    """Recipe of the detector trained on the poisoned training set (default: the paper's from-scratch ResNet-18
    recipe; scale down through config). From scratch only; ``mean``/``std`` null: the training set's own
    per-channel statistics."""

    def __post_init__(self) -> None:
        check(self.detector.transfer == "scratch", "detector.transfer",
              "must be scratch (the detector is trained on the poisoned set itself)")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, H, W, C) uint8 images (std floored at 1e-3)."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).tolist()), tuple(np.maximum(pixels.std(0), 1e-3).tolist())


def train_detector(train: ImageSet, cfg: ClassifierConfig, seed: int) -> Normalized:
    """A ``cfg.name`` classifier trained on ``train`` with the recipe ``cfg`` (initialised from ``seed``),
    eval mode, on [0, 1] images."""
    h, _, c = train.shape
    mean, std = channel_stats(train.images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_classifier(cfg.name, in_channels=c, num_classes=train.num_classes, image_size=h)
    model = Normalized(net, cfg.mean or mean, cfg.std or std)
    log.info("training the detector (%s, %d epochs) on %d images", cfg.name, cfg.epochs, len(train))
    return train_classifier(model, train, cfg, seed=seed).model.eval()


class RowFilter:
    """Base of a filter DataDefense: ``apply`` = train the detector, flag rows, keep the others. Subclasses
    implement :meth:`flag`."""

    cfg: FilterConfig

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """The detector architecture must accept the images."""
        h, _, c = train.shape
        try:
            build_classifier(self.cfg.detector.name, in_channels=c, num_classes=max(train.num_classes, 2),
                             image_size=h)
        except (KeyError, ValueError) as exc:
            raise UserInputError(f"defense.detector.name: {exc}") from None

    def fit_detector(self, train: ImageSet, *, seed: int) -> nn.Module:
        return train_detector(train, self.cfg.detector, seed)

    def flag(self, features: Tensor, labels: np.ndarray, *, seed: int) -> np.ndarray:
        """(N,) bool: the rows to remove, from (N, D) penultimate features and (N,) training labels."""
        raise NotImplementedError

    def flagged(self, train: ImageSet, detector: nn.Module, *, seed: int) -> np.ndarray:
        """(N,) bool over ``train``'s rows: those the filter removes, judged by ``detector``."""
        features, _ = features_and_logits(detector, train.images, self.cfg.detector.eval_batch_size)
        return self.flag(features, train.labels, seed=seed)

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        """``train`` without the flagged rows (order, ids and labels of the others kept)."""
        flags = self.flagged(train, self.fit_detector(train, seed=seed), seed=seed)
        return train.take(np.flatnonzero(~flags))


def per_class(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each class present in ``labels``, in label order."""
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]
