"""BadNets-style backdoor with three triggers, clean- or dirty-label.

* ``patch``: a square that overwrites pixels, from "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain" (Gu, Dolan-Gavitt, Garg, 2017), https://arxiv.org/abs/1708.06733.
* ``sign``: an additive full-image random sign pattern, ``x' = clip(x + delta)`` with ``delta = ±eps`` per
  pixel, so ``||x' - x||_inf <= eps`` and it is comparable to the clean-label attacks of the PureGen paper.
  Until this variant got its own name it was called ``blend``: an old config with ``trigger: blend`` and an
  explicit ``eps`` meant this sign pattern and should now say ``trigger: sign``.
* ``blend``: the alpha-blend of "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning"
  (Chen, Liu, Li, Lu, Song, 2017), https://arxiv.org/abs/1712.05526:
  ``x' = (1 - alpha) * x + alpha * pattern`` with a chosen image (Hello Kitty in the paper) or uniform random
  noise as the pattern, alpha = 0.2 in their poisoning experiments. Its L-inf change is at most alpha, which is
  the poison set's ``eps``. It is stored as a masked trigger (the pattern plus a constant mask alpha), the
  representation of a patch, so it needs no code path of its own.

Dirty-label: ``budget * N`` images of other classes get the trigger and are relabelled to the target class.
Clean-label: ``budget * N`` images of the target class get the trigger and keep their label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.config.errors import UserInputError, check, check_budget, check_eps
from puregen_dist.config.identity import file_ref, key_neutral_default
from puregen_dist.config.schema import AttackConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]
CHEN_ALPHA = 0.2
"""The blend weight of Chen et al.'s poisoning experiments."""


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
    trigger: Literal["patch", "sign", "blend"] = "patch"
    """patch: a pixel-overwriting square (Gu et al.); sign: an additive full-image ±eps random sign pattern
    (called ``blend`` before the alpha-blend existed); blend: Chen et al.'s alpha-blend
    ``(1 - alpha) * x + alpha * pattern``."""
    patch_size: int = 3
    """Side of the square patch in pixels."""
    patch_location: Corner = "bottom_right"
    pattern: Literal["checkerboard", "white", "random"] = "checkerboard"
    """Patch content (random: seeded by trigger_seed)."""
    eps: float = 16 / 255
    """sign only: L-inf bound of the sign pattern in [0, 1] pixel units."""
    alpha: float | None = key_neutral_default(None)
    """blend only: blend weight of the pattern, in (0, 1]; null means Chen et al.'s 0.2 for ``blend`` (always part
    of a blend's content key, so an old config whose ``blend`` meant the sign pattern never finds the new
    attack's cache) and is the only value allowed for the other triggers. Also the blend's L-inf bound."""
    blend_image: str | None = file_ref(optional=True)
    """blend only: the pattern image, a .png/.jpg file or a .npy (H, W, C) array (uint8, or float in [0, 1]);
    resized to the dataset's H x W (bilinear) and converted to its channels. None: uniform random noise drawn
    from trigger_seed (Chen et al.'s random pattern)."""
    trigger_seed: int = 0
    """Seed of random patterns; independent of the experiment seed so seeds vary the poisoned rows only."""

    def __post_init__(self) -> None:
        check(self.target_class >= 0, "target_class", "must be >= 0")
        check_budget(self.budget)
        check_eps(self.eps, 16)
        if self.trigger == "blend":
            if self.alpha is None:
                object.__setattr__(self, "alpha", CHEN_ALPHA)
            check(0.0 < self.alpha <= 1.0, "alpha", "must lie in (0, 1] (the blend weight of the pattern)")
        else:
            check(self.alpha is None, "alpha", f"only used with trigger: blend (this is trigger: {self.trigger})")
            check(self.blend_image is None, "blend_image",
                  f"only used with trigger: blend (this is trigger: {self.trigger})")
        check(self.patch_size >= 1, "patch_size", "must be >= 1 pixel")


class BadNetsAttack:
    """Crafts BadNets poisons; see the module docstring."""

    def __init__(self, cfg: BadNetsConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Data-dependent checks, run before any compute: the target exists, the patch fits, the blend image
        is readable, the budget is feasible."""
        cfg = self.cfg
        if cfg.target_class >= train.num_classes:
            raise UserInputError(f"attack.target_class: {cfg.target_class} is not a class of the dataset "
                                 f"(expected 0..{train.num_classes - 1})")
        if cfg.trigger == "blend" and cfg.blend_image is not None:
            load_blend_image(cfg.blend_image, train.shape)
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
        if cfg.trigger == "sign":
            delta = cfg.eps * np.sign(rng.standard_normal((h, w, c))).astype(np.float32)
            return TargetSpec("triggered", target_class=cfg.target_class, trigger=delta)
        if cfg.trigger == "blend":
            pattern = (load_blend_image(cfg.blend_image, shape) if cfg.blend_image is not None
                       else (rng.integers(0, 256, (h, w, c)) / 255.0).astype(np.float32))
            mask = np.full((h, w, 1), cfg.alpha, np.float32)
            return TargetSpec("triggered", target_class=cfg.target_class, trigger=pattern, trigger_mask=mask)
        p = cfg.patch_size
        patch = _patch_pattern(cfg.pattern, p, c, rng)
        top = 0 if cfg.patch_location.startswith("top") else h - p
        left = 0 if cfg.patch_location.endswith("left") else w - p
        pattern = np.zeros((h, w, c), np.float32)
        mask = np.zeros((h, w, 1), np.float32)
        pattern[top:top + p, left:left + p] = patch
        mask[top:top + p, left:left + p] = 1.0
        return TargetSpec("triggered", target_class=cfg.target_class, trigger=pattern, trigger_mask=mask)

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
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
        eps = {"sign": cfg.eps, "blend": cfg.alpha}.get(cfg.trigger, 1.0)
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


def load_blend_image(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The image at ``path`` as an (H, W, C) float32 pattern in [0, 1] for images of (H, W, C) ``shape``.

    .npy files hold (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) arrays, uint8 or float in [0, 1]; any other file
    is opened with PIL. RGB becomes grey by PIL's luminance weights, grey is repeated, alpha is dropped; a
    different size is resized bilinearly. Raises UserInputError naming ``attack.blend_image`` when the file is
    missing, unreadable or not an image.
    """
    try:
        image = _read_image(Path(path))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"attack.blend_image: cannot read {path!r}: {exc}") from None
    return _fit_image(image, shape)


def _read_image(path: Path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C in {1, 3, 4}; ValueError or OSError when it is none."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W, C) array with C in 1, 3, 4, got shape {array.shape}")
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255.0
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all() \
                or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"expected uint8 or float values in [0, 1], got {array.dtype} "
                             f"in [{array.min()}, {array.max()}]")
        return array.astype(np.float32)
    with Image.open(path) as img:
        img = img.convert("L" if img.mode in ("1", "L", "LA") else "RGB")
        array = np.asarray(img, dtype=np.float32) / 255.0
    return array[:, :, None] if array.ndim == 2 else array


def _fit_image(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``image`` (H', W', C') converted to ``shape``'s channels and resized bilinearly to its H x W."""
    h, w, c = shape
    image = image[:, :, :3]  # drop alpha
    if image.shape[2] != c:
        if c == 1:  # PIL's "L" conversion (ITU-R 601-2 luma)
            image = image @ np.array([[0.299], [0.587], [0.114]], np.float32)
        else:
            image = np.repeat(image, c, axis=2)
    if image.shape[:2] != (h, w):
        bilinear = Image.Resampling.BILINEAR  # float32 arrays open as mode "F" images
        channels = [Image.fromarray(np.ascontiguousarray(image[:, :, k])).resize((w, h), bilinear)
                    for k in range(c)]
        image = np.stack([np.asarray(ch, dtype=np.float32) for ch in channels], axis=2)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@ATTACKS.register("badnets", BadNetsConfig)
def build_badnets(cfg: BadNetsConfig) -> BadNetsAttack:
    return BadNetsAttack(cfg)
