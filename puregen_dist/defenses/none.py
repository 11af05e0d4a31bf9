"""The null defense: train on the (possibly poisoned) set as is."""

from __future__ import annotations

from puregen_dist.config.schema import NoDefenseConfig
from puregen_dist.registry import DEFENSES
from puregen_dist.types import ImageSet


class NoDefense:
    """Identity DataDefense."""

    def __init__(self, cfg: NoDefenseConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Works on any image set."""

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        return train


@DEFENSES.register("none", NoDefenseConfig)
def build_no_defense(cfg: NoDefenseConfig) -> NoDefense:
    return NoDefense(cfg)
