"""Poisoning attacks: ``Attack.craft(train, *, surrogate, seed, test) -> PoisonSet``. Importing registers them."""

from puregen_dist.attacks import badnets, bullseye, gradient_matching, imports, narcissus, none  # noqa: F401  (registers)
from puregen_dist.registry import ATTACKS


def build_attack(cfg):  # noqa: ANN001, ANN201
    """The attack configured by ``cfg`` (an AttackConfig subclass chosen by its ``name``)."""
    return ATTACKS.build(cfg.name, cfg)


__all__ = ["ATTACKS", "build_attack"]
