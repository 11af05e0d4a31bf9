"""Metrics of DESIGN §6: natural accuracy and triggered poison success (Narcissus-paper definition).

Natural accuracy: top-1 on the clean test set. Triggered poison success at magnification m: the share of test
images whose true label is not the target class that are classified as the target class once the trigger (scaled
by m) is applied. Test images are never purified. Aggregation over target classes: mean ± std (ddof=1) and max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.data.transforms import to_unit
from puregen_dist.types import ImageSet, TargetSpec

NAT_ACC_DEFINITION = "top-1 accuracy on the clean (never purified) test set after the last epoch"
POISON_SUCCESS_DEFINITION = (
    "share of test images with true label != target class that are classified as the target class after adding "
    "the trigger at magnification m (DESIGN §6; per target class, aggregated as mean ± std and max over targets)"
)


@dataclass(frozen=True)
class PoisonSuccess:
    """Triggered poison success for one target class at one magnification.

    Attributes:
        rate: in [0, 1], over all non-target-class test images.
        per_source_class: rate among test images of each true class (the target class is absent).
        count: number of non-target-class test images measured.
    """

    rate: float
    per_source_class: dict[int, float]
    count: int


@torch.no_grad()
def predict(model: nn.Module, x_unit: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Argmax predictions (N,) int64 of ``model`` (eval mode) on (N, C, H, W) [0, 1] images."""
    model.eval()
    device = next(model.parameters()).device
    preds = [model(x_unit[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x_unit), batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)


def natural_accuracy(model: nn.Module, test: ImageSet, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] on the clean ``test`` set."""
    return float((predict(model, to_unit(test.images), batch_size) == test.labels).mean())


def poison_success(
    model: nn.Module, test: ImageSet, target: TargetSpec, magnification: float = 1.0, batch_size: int = 512
) -> PoisonSuccess:
    """Triggered poison success of ``target`` at ``magnification`` (see the module docstring)."""
    if target.target_class is None:
        raise ValueError("poison_success needs a triggered target (target_class is None)")
    keep = test.labels != target.target_class
    x = apply_trigger(to_unit(test.images[keep]), target, magnification)
    hit = predict(model, x, batch_size) == target.target_class
    sources = test.labels[keep]
    per_class = {int(c): float(hit[sources == c].mean()) for c in np.unique(sources)}
    return PoisonSuccess(float(hit.mean()) if len(hit) else 0.0, per_class, int(keep.sum()))


@dataclass(frozen=True)
class TargetOutcome:
    """Triggerless success of one trial (PUREGEN_REFERENCE §6.3): ``success`` = share of the target images
    classified as the adversarial label (1.0 / 0.0 for the usual single target), ``correct`` = share classified as
    their true label; ``predictions`` (T,) int64."""

    success: float
    correct: float
    predictions: np.ndarray


def target_outcome(model: nn.Module, test: ImageSet, target: TargetSpec, batch_size: int = 512) -> TargetOutcome:
    """Classify a triggerless attack's target image(s): ``target_images`` with ``target_labels`` (imported
    trials), else the test rows ``target_ids``. Raises ValueError when the target has neither or no
    adversarial label."""
    if target.adversarial_label is None:
        raise ValueError("target_outcome needs a triggerless target with an adversarial_label")
    if target.target_images is not None:
        images, labels = target.target_images, target.target_labels
    elif target.target_ids is not None:
        rows = test.positions(np.asarray(target.target_ids, np.int64))
        images, labels = test.images[rows], test.labels[rows]
    else:
        raise ValueError("target_outcome needs target_images or target_ids")
    predictions = predict(model, to_unit(images), batch_size)
    correct = float((predictions == labels).mean()) if labels is not None else float("nan")
    return TargetOutcome(float((predictions == target.adversarial_label).mean()), correct, predictions)


def aggregate_over_targets(rates: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof=1; 0 for a single target) and max of per-target-class success rates."""
    values = np.asarray(rates, dtype=np.float64)
    if values.size == 0:
        raise ValueError("aggregate_over_targets needs at least one rate")
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "max": float(values.max()), "n": float(values.size)}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (triggerless attacks: one target per trial)."""
    if trials <= 0:
        raise ValueError("wilson_interval needs at least one trial")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
