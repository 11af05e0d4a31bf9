"""The seams: every family plugs in through one verb."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.types import ImageSet, PoisonSet


@runtime_checkable
class Attack(Protocol):
    """Crafts a poison set from a clean training set. ``test`` is the clean test split, for attacks whose target
    is a test image (triggerless attacks); callers pass it when they have it, and other attacks ignore it."""

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet: ...


@runtime_checkable
class DataDefense(Protocol):
    """Acts on the training set before training. Preserves ids, labels and order (JPEG, PureGen); a filter
    (``DefenseConfig.removes_rows``: Spectral Signatures, Activation Clustering) returns a subset of the rows,
    in order, with their ids and labels."""

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet: ...


class TrainHook(Protocol):
    """A training defense's grip on the training loop (:func:`~puregen_dist.classifiers.training.train_classifier`).

    Subclass it to inherit the no-op defaults and override what the defense needs."""

    def on_epoch_start(self, epoch: int, data: ImageSet, model: nn.Module) -> ImageSet:
        """Before epoch ``epoch`` (1-based): ``data`` is the training set this epoch starts from (the full set,
        or what an earlier hook made of it this epoch); returns the set to train on (a subset keeps ids: EPIC;
        other images: FRIENDS' friendly noise). ``model`` is the classifier in train mode; leave it so."""
        return data

    def on_batch(self, x: Tensor, ids: Tensor, generator: torch.Generator) -> Tensor:
        """Each training batch after augmentation: ``x`` (B, C, H, W) float in [0, 1] on the training device,
        ``ids`` (B,) int64 (CPU) of its rows; returns the batch to train on (FRIENDS' random noise). Draw any
        randomness from ``generator`` (the CPU generator of the training seed)."""
        return x

    def summary(self) -> dict[str, float]:
        """After training: metrics to log with the run's final metrics (``defense_seconds``: the hook's own
        compute, e.g. optimising friendly noise or EPIC's selection rounds)."""
        return {}


@runtime_checkable
class TrainingDefense(Protocol):
    """Acts during training (FRIENDS, EPIC) through hooks; its ``apply`` leaves the training set unchanged."""

    def hooks(self, *, seed: int) -> Sequence[TrainHook]:
        """Fresh hooks for one training run (they hold its state); ``seed`` drives their randomness."""
        ...


@runtime_checkable
class Purifier(Protocol):
    """Pure purification on one device: (B, C, H, W) float in [-1, 1] -> same shape and range."""

    def purify(self, x: Tensor, ids: Tensor, *, seed: int) -> Tensor: ...


class GenerativeDefense(Protocol):
    """A data defense the pipeline runs on an actor pool (config ``pipeline = "actor_pool"``): the actor
    builds it once, then calls ``purifier.purify`` on batches moved to ``device``."""

    purifier: Purifier
    device: Any
    """A ``torch.device`` or device string."""

    def validate(self, train: ImageSet) -> None: ...

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet: ...


@runtime_checkable
class Tracker(Protocol):
    """Experiment tracking (MLflow behind it; a null tracker for unit tests)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None: ...
