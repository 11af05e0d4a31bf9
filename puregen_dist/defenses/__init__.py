"""Defenses: ``DataDefense.apply(train, *, seed)`` before training (JPEG, PureGen; the filters Spectral Signatures
and Activation Clustering), ``TrainingDefense.hooks(seed=...)`` during it (FRIENDS, EPIC).
Importing this package registers the built-in ones."""

from puregen_dist.defenses import (  # noqa: F401  (registers)
    activation_clustering,
    epic,
    friends,
    jpeg,
    none,
    puregen,
    spectral,
)
from puregen_dist.registry import DEFENSES


def build_defense(cfg):  # noqa: ANN001, ANN201
    """The defense configured by ``cfg`` (a DefenseConfig subclass chosen by its ``name``)."""
    return DEFENSES.build(cfg.name, cfg)


__all__ = ["DEFENSES", "build_defense"]
