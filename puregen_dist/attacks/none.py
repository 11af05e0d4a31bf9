"""The null attack: the clean training set, for baselines of natural accuracy."""

from __future__ import annotations

import numpy as np

from puregen_dist.config.schema import NoAttackConfig
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec


class NoAttack:
    """Returns the clean set as a PoisonSet with no poisoned rows."""

    def __init__(self, cfg: NoAttackConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Nothing to check."""

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        empty = np.zeros((0, *train.shape), dtype=np.uint8)
        return PoisonSet(train, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), TargetSpec("none"), 0.0)


@ATTACKS.register("none", NoAttackConfig)
def build_no_attack(cfg: NoAttackConfig) -> NoAttack:
    return NoAttack(cfg)
