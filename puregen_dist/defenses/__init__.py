"""Defenses: ``DataDefense.apply(train, *, seed)`` before training, ``TrainingDefense.hooks()`` during it.
Importing this package registers the built-in ones."""

from puregen_dist.defenses import jpeg, none, puregen  # noqa: F401  (registers)
from puregen_dist.registry import DEFENSES


def build_defense(cfg):  # noqa: ANN001, ANN201
    """The defense configured by ``cfg`` (a DefenseConfig subclass chosen by its ``name``)."""
    return DEFENSES.build(cfg.name, cfg)


__all__ = ["DEFENSES", "build_defense"]
