"""The seams: every family plugs in through one verb."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
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
    """Acts on the training set before training (JPEG, PureGen). Preserves ids, labels and order."""

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet: ...


class TrainHook(Protocol):
    """Called by the training loop at the start of each epoch; may return a modified training set."""

    def on_epoch_start(self, epoch: int, data: ImageSet, model: nn.Module) -> ImageSet: ...


@runtime_checkable
class TrainingDefense(Protocol):
    """Acts during training (FRIENDS, EPIC) through hooks."""

    def hooks(self) -> Sequence[TrainHook]: ...


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
