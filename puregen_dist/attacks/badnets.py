"""BadNets-style backdoor: a patch trigger or a blended full-image pattern, clean- or dirty-label.

Paper: "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain" (Gu, Dolan-Gavitt, Garg,
2017), https://arxiv.org/abs/1708.06733. The blended variant follows "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning" (Chen et al., 2017), https://arxiv.org/abs/1712.05526, with the pattern scaled to an
L-inf bound eps so it is comparable to the clean-label attacks of the PureGen paper.

Dirty-label: ``budget * N`` images of other classes get the trigger and are relabelled to the target class.
Clean-label: ``budget * N`` images of the target class get the trigger and keep their label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.config.errors import UserInputError, check
from puregen_dist.config.schema import AttackConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


@dataclass(frozen=True, kw_only=True)
class BadNetsConfig(AttackConfig):
    """BadNets backdoor parameters."""

    name: str = "badnets"
    target_class: int = 0
    """Class the trigger should send test images to."""
    budget: float = 0.1
    """Fraction of the training set that is poisoned, in (0, 1]."""
    label_mode: Literal["dirty", "clean"] = "dirty"
    """dirty: other-class images relabelled to the target; clean: target-class images keep their label."""
    trigger: Literal["patch", "blend"] = "patch"
    """patch: a pixel-overwriting square; blend: an additive full-image pattern with ||delta||_inf = eps."""
    patch_size: int = 3
    """Side of the square patch in pixels."""
    patch_location: Corner = "bottom_right"
    pattern: Literal["checkerboard", "white", "random"] = "checkerboard"
    """Patch content (random: seeded by trigger_seed)."""
    eps: float = 16 / 255
    """blend only: L-inf bound of the pattern in [0, 1] pixel units."""
    trigger_seed: int = 0
    """Seed of random patterns; independent of the experiment seed so seeds vary the poisoned rows only."""

    def __post_init__(self) -> None:
        check(self.target_class >= 0, "target_class", "must be >= 0")
        check(0.0 < self.budget <= 1.0, "budget", "must lie in (0, 1] (a fraction of the training set)")
        check(0.0 < self.eps <= 1.0, "eps", "must lie in (0, 1] (pixel units; 16/255 = 0.0627)")
        check(self.patch_size >= 1, "patch_size", "must be >= 1 pixel")


class BadNetsAttack:
    """Crafts BadNets poisons; see the module docstring."""

    def __init__(self, cfg: BadNetsConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Data-dependent checks, run before any compute: the target exists, the patch fits, the budget is
        feasible."""
        cfg = self.cfg
        if cfg.target_class >= train.num_classes:
            raise UserInputError(f"attack.target_class: {cfg.target_class} is not a class of the dataset "
                                 f"(expected 0..{train.num_classes - 1})")
        h, w, _ = train.shape
        if cfg.trigger == "patch" and cfg.patch_size > min(h, w):
            raise UserInputError(f"attack.patch_size: {cfg.patch_size} does not fit {h}x{w} images")
        n_poison, candidates = self._count(train), self._candidates(train)
        if n_poison > len(candidates):
            raise UserInputError(
                f"attack.budget: {cfg.budget} asks for {n_poison} poisons but only {len(candidates)} "
                f"{'target-class' if cfg.label_mode == 'clean' else 'non-target-class'} images exist")

    def trigger_spec(self, shape: tuple[int, int, int]) -> TargetSpec:
        """The trigger for images of (H, W, C) ``shape``."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.trigger_seed)
        h, w, c = shape
        if cfg.trigger == "blend":
            delta = cfg.eps * np.sign(rng.standard_normal((h, w, c))).astype(np.float32)
            return TargetSpec("triggered", target_class=cfg.target_class, trigger=delta)
        p = cfg.patch_size
        patch = _patch_pattern(cfg.pattern, p, c, rng)
        top = 0 if cfg.patch_location.startswith("top") else h - p
        left = 0 if cfg.patch_location.endswith("left") else w - p
        pattern = np.zeros((h, w, c), np.float32)
        mask = np.zeros((h, w, 1), np.float32)
        pattern[top:top + p, left:left + p] = patch
        mask[top:top + p, left:left + p] = 1.0
        return TargetSpec("triggered", target_class=cfg.target_class, trigger=pattern, trigger_mask=mask)

    def craft(self, train: ImageSet, *, surrogate: nn.Module | None = None, seed: int) -> PoisonSet:
        """Poison ``budget * N`` rows chosen with ``seed``; returns the delta-plus-lookup PoisonSet."""
        self.validate(train)
        start = time.perf_counter()
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        candidates = self._candidates(train)
        chosen = np.sort(rng.choice(candidates, size=self._count(train), replace=False))
        target = self.trigger_spec(train.shape)
        with torch.no_grad():
            poisoned = unit_to_uint8(apply_trigger(to_unit(train.images[chosen]), target, 1.0))
        labels = np.full(len(chosen), cfg.target_class, np.int64)
        eps = cfg.eps if cfg.trigger == "blend" else 1.0
        meta = {"craft_seconds": time.perf_counter() - start, "num_poisons": int(len(chosen))}
        return PoisonSet(train, train.ids[chosen], poisoned, labels, target, eps, meta)

    def _count(self, train: ImageSet) -> int:
        return max(1, int(round(self.cfg.budget * len(train))))

    def _candidates(self, train: ImageSet) -> np.ndarray:
        """Positions of the rows eligible for poisoning."""
        is_target = train.labels == self.cfg.target_class
        return np.flatnonzero(is_target if self.cfg.label_mode == "clean" else ~is_target)


def _patch_pattern(kind: str, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, channels) float32 in [0, 1]."""
    if kind == "white":
        return np.ones((size, size, channels), np.float32)
    if kind == "random":
        return rng.integers(0, 2, (size, size, channels)).astype(np.float32)
    board = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32)
    return np.repeat(board[:, :, None], channels, axis=2)


@ATTACKS.register("badnets", BadNetsConfig)
def build_badnets(cfg: BadNetsConfig) -> BadNetsAttack:
    return BadNetsAttack(cfg)
