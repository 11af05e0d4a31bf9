"""What every clean-label triggered attack shares (Narcissus crafted here, published triggers imported): the
target class, the budget of poisoned target-class images (a fraction of the training set or a count), which
target-class rows carry the trigger, and stamping an additive trigger on them with labels unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.config.errors import UserInputError, check, check_budget, check_eps
from puregen_dist.config.schema import AttackConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

Selection = Literal["random", "last"]


@dataclass(frozen=True, kw_only=True)
class CleanLabelTriggerConfig(AttackConfig):
    """Base of clean-label triggered attacks: ``num_poisons`` (or ``budget`` × N) training images of
    ``target_class`` carry an additive trigger bounded by ``eps``; labels are unchanged."""

    target_class: int = 0
    """Class the trigger sends test images to; its training images carry the trigger."""
    eps: float = 8 / 255
    """L∞ bound of the trigger in [0, 1] pixel units."""
    budget: float = 0.01
    """Poisoned images as a fraction of the training set (PureGen: 1% of CIFAR-10 = 500)."""
    num_poisons: int | None = None
    """A count of poisoned images instead of ``budget`` (Narcissus' original: 25)."""
    selection: Selection = "random"
    """Which target-class images carry the trigger: ``random`` (seeded by the experiment seed) or ``last`` (the
    last ones in id order, as PureGen poisoned the last 500 of class c)."""

    def __post_init__(self) -> None:
        check(self.target_class >= 0, "target_class", "must be >= 0")
        check_eps(self.eps, 8)
        check_budget(self.budget)
        check(self.num_poisons is None or self.num_poisons >= 1, "num_poisons", "must be >= 1 (or null)")


def poison_count(cfg: CleanLabelTriggerConfig, train: ImageSet) -> int:
    """``num_poisons``, else ``max(1, round(budget × N))``."""
    return cfg.num_poisons if cfg.num_poisons is not None else max(1, int(round(cfg.budget * len(train))))


def check_target_and_budget(cfg: CleanLabelTriggerConfig, train: ImageSet) -> None:
    """UserInputError (naming the key) when the target class is not a class of ``train`` or the budget asks for
    more poisons than it has target-class images."""
    if cfg.target_class >= train.num_classes:
        raise UserInputError(f"attack.target_class: {cfg.target_class} is not a class of the dataset "
                             f"(expected 0..{train.num_classes - 1})")
    count, available = poison_count(cfg, train), int(np.sum(train.labels == cfg.target_class))
    if count > available:
        key = "num_poisons" if cfg.num_poisons is not None else "budget"
        raise UserInputError(f"attack.{key}: asks for {count} poisons but class {cfg.target_class} has only "
                             f"{available} training images")


def choose_poison_rows(cfg: CleanLabelTriggerConfig, train: ImageSet, seed: int) -> np.ndarray:
    """Sorted positions of the target-class rows that carry the trigger (see ``selection``)."""
    candidates = np.flatnonzero(train.labels == cfg.target_class)
    count = poison_count(cfg, train)
    if cfg.selection == "last":
        by_id = candidates[np.argsort(train.ids[candidates], kind="stable")]
        return np.sort(by_id[len(by_id) - count:])
    return np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))


def stamp_trigger(cfg: CleanLabelTriggerConfig, train: ImageSet, trigger: np.ndarray, seed: int,
                  meta: dict[str, object]) -> PoisonSet:
    """The PoisonSet of ``trigger`` ((H, W, C) float32, pixel units, |δ| <= eps) added to the chosen
    target-class rows: clip(x + δ, 0, 1) rounded to 8 bits, labels unchanged; ``meta`` gains ``num_poisons``."""
    chosen = choose_poison_rows(cfg, train, seed)
    target = TargetSpec("triggered", target_class=cfg.target_class, trigger=trigger)
    with torch.no_grad():
        poisoned = unit_to_uint8(apply_trigger(to_unit(train.images[chosen]), target, 1.0))
    meta = {**meta, "num_poisons": int(len(chosen))}
    return PoisonSet(train, train.ids[chosen], poisoned, train.labels[chosen].copy(), target, cfg.eps, meta)


__all__ = ["CleanLabelTriggerConfig", "Selection", "check_target_and_budget", "choose_poison_rows", "poison_count",
           "stamp_trigger"]
