"""Data at rest: uint8 images plus stable ids, so they cross Ray and Parquet without pickling torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set.

    Attributes:
        images: (N, H, W, C) uint8.
        labels: (N,) int64 class indices.
        ids: (N,) int64, unique, stable through every transform (poisoning, purification, subsetting).
        classes: class names; ``labels`` index into it.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"ImageSet.images must be a (N, H, W, C) uint8 array, got {self.images.dtype} {self.images.shape}"
            )
        n = len(self.images)
        for name in ("labels", "ids"):
            arr = getattr(self, name)
            if arr.shape != (n,) or arr.dtype != np.int64:
                raise ValueError(f"ImageSet.{name} must be ({n},) int64, got {arr.dtype} {arr.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"ImageSet.labels must lie in [0, {len(self.classes)}) (one per class name)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, index: np.ndarray) -> ImageSet:
        """The rows at positional ``index`` (ids travel with them)."""
        return ImageSet(self.images[index], self.labels[index], self.ids[index], self.classes)

    def replace(self, *, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> ImageSet:
        """A copy with new images and/or labels, same ids and classes."""
        return ImageSet(
            self.images if images is None else images,
            self.labels if labels is None else labels,
            self.ids,
            self.classes,
        )

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positional indices of ``ids`` in this set; raises if any id is absent."""
        order = np.argsort(self.ids, kind="stable")
        found = np.searchsorted(self.ids, ids, sorter=order)
        found = np.clip(found, 0, len(self.ids) - 1)
        pos = order[found]
        missing = self.ids[pos] != ids
        if np.any(missing):
            raise KeyError(f"ids not in the image set: {ids[missing][:10].tolist()}")
        return pos


@dataclass(frozen=True)
class TargetSpec:
    """What the attack aims at.

    Triggered attacks set ``target_class`` and ``trigger`` ((H, W, C) float32 in [0, 1] pixel units): without
    ``trigger_mask`` an additive perturbation applied as ``clip(x + m * trigger)``; with ``trigger_mask``
    ((H, W, 1) float32 in [0, 1]) a pattern mixed in as ``x * (1 - mask) + mask * trigger`` (1 on a patch that
    overwrites pixels, a constant alpha for an alpha-blend); see
    :func:`~puregen_dist.attacks.triggers.apply_trigger`.
    Triggerless attacks set ``adversarial_label`` (the class the targets should be predicted as) and their
    targets: ``target_ids`` (ids of a split) or, for imported poisons whose targets come with the files,
    ``target_images`` ((T, H, W, C) uint8) with their true labels ``target_labels`` ((T,) int64).
    Availability attacks (every training row perturbed to lower clean accuracy, e.g. NTGA) set nothing
    else: their effect is the natural accuracy. ``none``: no attack.
    """

    kind: str  # "triggered" | "triggerless" | "availability" | "none"
    target_class: int | None = None
    trigger: np.ndarray | None = None
    trigger_mask: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    adversarial_label: int | None = None
    target_images: np.ndarray | None = None
    target_labels: np.ndarray | None = None


@dataclass(frozen=True)
class PoisonSet:
    """A clean base set plus the poisoned rows that replace it at ``poison_ids`` (forest's delta + lookup).

    Attributes:
        base: the clean training set.
        poison_ids: (P,) int64 ids of ``base`` rows that are replaced.
        poisoned: (P, H, W, C) uint8 images replacing those rows.
        poison_labels: (P,) int64 training labels of the poisoned rows (differ from base only for dirty-label).
        target: what the attack aims at.
        eps: L-inf bound in [0, 1] pixel units.
        meta: crafting metadata (seconds, parameters) for logging.
    """

    base: ImageSet
    poison_ids: np.ndarray
    poisoned: np.ndarray
    poison_labels: np.ndarray
    target: TargetSpec
    eps: float
    meta: dict[str, Any] = field(default_factory=dict)

    def materialize(self) -> ImageSet:
        """The training set with the poisoned rows in place (same ids, order and classes as ``base``)."""
        if len(self.poison_ids) == 0:
            return self.base
        pos = self.base.positions(self.poison_ids)
        images = self.base.images.copy()
        labels = self.base.labels.copy()
        images[pos] = self.poisoned
        labels[pos] = self.poison_labels
        return self.base.replace(images=images, labels=labels)

    @property
    def budget(self) -> float:
        """Fraction of the training set that is poisoned."""
        return len(self.poison_ids) / max(len(self.base), 1)
