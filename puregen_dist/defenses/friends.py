"""FRIENDS, a training-time defense: friendly noise plus random noise on every training image.

Paper: "Friendly Noise against Adversarial Noise: A Powerful Defense against Data Poisoning Attacks" (Liu, Yang,
Mirzasoleiman; NeurIPS 2022), https://arxiv.org/abs/2208.10224; code: tianyu139/friendly-noise. PureGen compares
against FRIENDS-B (Bernoulli) and FRIENDS-G (Gaussian) (PUREGEN_REFERENCE §4.2).

1. At epoch index ``begin_epoch`` (0-based, as in the original) the current classifier is copied and frozen.
   For each batch of un-augmented training images x in [0, 1], noise e ~ U(-init, init) is optimised for
   ``iterations`` steps of SGD (lr ``lr``, momentum 0.9, Nesterov; MultiStepLR x ``gamma`` at iterations
   ``iterations // 2`` and ``iterations // 4 * 3``) on

       L(e) = KL(softmax f(x) || softmax f(clamp(x + e_c, 0, 1))) - mu * mean(e_c ** 2),   e_c = clamp(e, +-clamp)

   (KL averaged over the batch, the square over every element): the largest noise that keeps the model's
   output. ``clamp(e)`` is stored per sample id.
2. From then on every training image is ``clamp(x + e, 0, 1)``, stored as 8-bit (as PureGen's pipeline does),
   augmented (crop, flip), plus fresh random noise per pixel and step: ``+-noise_eps`` with probability 1/2
   each (FRIENDS-B) or ``N(0, noise_eps^2)`` (FRIENDS-G), not clamped (as in both originals).

The noise is optimised once (the original); ``refresh_every`` > 0 optimises it again every that many epochs.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.classifiers.features import head_of
from puregen_dist.config.errors import check
from puregen_dist.config.identity import PipelineKind
from puregen_dist.config.schema import DefenseConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.defenses.training_time import TrainingTimeDefense, epoch_index
from puregen_dist.protocols import TrainHook
from puregen_dist.registry import DEFENSES
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

RandomNoise = Literal["bernoulli", "gaussian"]


@dataclass(frozen=True, kw_only=True)
class FriendsConfig(DefenseConfig):
    """FRIENDS parameters (defaults: PureGen's runs, Configs/config.ini; the original's mu is 1 and its noise
    optimisation runs 30 iterations)."""

    pipeline: ClassVar[PipelineKind] = "none"
    random_noise: ClassVar[RandomNoise] = "bernoulli"
    name: str = "friends_b"
    begin_epoch: int = 5
    """Epoch index (0-based) at which the friendly noise is optimised and applied (0 for transfer)."""
    iterations: int = 20
    """SGD iterations of the noise optimisation per batch."""
    lr: float = 100.0
    momentum: float = 0.9
    nesterov: bool = True
    gamma: float = 0.1
    """Learning-rate factor at iterations ``iterations // 2`` and ``iterations // 4 * 3``."""
    mu: float = 16.0
    """Weight of the noise-magnitude reward mean(e^2) (PureGen 16; the original's default 1)."""
    clamp: float = 16 / 255
    """L-inf bound of the friendly noise (pixel units)."""
    init: float = 8 / 255
    """The noise starts uniform in [-init, init]."""
    noise_eps: float = 8 / 255
    """Random noise: the Bernoulli amplitude or the Gaussian standard deviation (pixel units)."""
    batch_size: int = 128
    """Images per noise-optimisation batch (the KL is a batch mean, so it scales each image's step)."""
    model_mode: Literal["eval", "train"] = "eval"
    """Mode of the frozen copy: ``eval`` (the original; running BatchNorm statistics) or ``train`` (PureGen's
    code: batch statistics)."""
    refresh_every: int = 0
    """Optimise the friendly noise again every this many epochs after ``begin_epoch`` (0: once, the original)."""

    def __post_init__(self) -> None:
        check(self.begin_epoch >= 0, "begin_epoch", "must be >= 0 (a 0-based epoch index)")
        check(self.iterations >= 1, "iterations", "must be >= 1")
        for key in ("lr", "clamp", "init", "noise_eps"):
            value = getattr(self, key)
            check(math.isfinite(value) and value > 0, key, "must be a finite number > 0")
        check(self.clamp <= 1.0 and self.init <= 1.0, "clamp", "clamp and init must be <= 1 (pixel units)")
        check(0.0 <= self.momentum < 1.0, "momentum", "must lie in [0, 1)")
        check(0.0 < self.gamma <= 1.0, "gamma", "must lie in (0, 1]")
        check(math.isfinite(self.mu) and self.mu >= 0, "mu", "must be a finite number >= 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.refresh_every >= 0, "refresh_every", "must be >= 0 (0: optimise once)")

    def check_epochs(self, epochs: int) -> None:
        check(self.begin_epoch < epochs, "defense.begin_epoch",
              f"must be < classifier.epochs ({epochs}): it is a 0-based epoch index, and the friendly noise would "
              "never be applied")


@dataclass(frozen=True, kw_only=True)
class FriendsGaussianConfig(FriendsConfig):
    """FRIENDS-G: friendly noise plus Gaussian noise."""

    random_noise: ClassVar[RandomNoise] = "gaussian"
    name: str = "friends_g"


def friendly_noise(model: nn.Module, x: Tensor, cfg: FriendsConfig, generator: torch.Generator) -> Tensor:
    """Friendly noise for one batch ``x`` (B, C, H, W) in [0, 1] against ``model`` (frozen, in the mode the
    caller set): the minimiser of L(e) above after ``cfg.iterations`` steps, clamped to +-``cfg.clamp``."""
    init = (torch.rand(x.shape, generator=generator) * 2 - 1) * cfg.init
    noise = init.to(x.device).requires_grad_(True)
    optimizer = torch.optim.SGD([noise], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    milestones = [cfg.iterations // 2, cfg.iterations // 4 * 3]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.gamma)
    with torch.no_grad():
        clean_log_probs = torch.log_softmax(model(x), dim=1)
    for _ in range(cfg.iterations):
        bounded = noise.clamp(-cfg.clamp, cfg.clamp)
        log_probs = torch.log_softmax(model((x + bounded).clamp(0.0, 1.0)), dim=1)
        kl = nn.functional.kl_div(log_probs, clean_log_probs, reduction="batchmean", log_target=True)
        loss = kl - cfg.mu * bounded.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return noise.detach().clamp(-cfg.clamp, cfg.clamp)


def frozen_copy(model: nn.Module, mode: str) -> nn.Module:
    """A copy of ``model`` with gradients off, in ``mode`` ("eval" or "train")."""
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    return frozen.train(mode == "train")


def friendly_images(model: nn.Module, data: ImageSet, cfg: FriendsConfig, generator: torch.Generator
                    ) -> tuple[np.ndarray, float]:
    """``data``'s images with their friendly noise, as 8-bit (N, H, W, C) in ``data``'s order (optimised in
    batches of ``cfg.batch_size``), and the noise's mean absolute value."""
    frozen = frozen_copy(model, cfg.model_mode)
    device = head_of(frozen).weight.device
    images, total = [], 0.0
    for start in range(0, len(data), cfg.batch_size):
        x = to_unit(data.images[start:start + cfg.batch_size]).to(device)
        noise = friendly_noise(frozen, x, cfg, generator)
        images.append(unit_to_uint8(x + noise))
        total += float(noise.abs().sum())
    return np.concatenate(images), total / max(data.images.size, 1)


def random_noise(shape: torch.Size, kind: RandomNoise, eps: float, generator: torch.Generator) -> Tensor:
    """Per-element random noise on CPU: ``+-eps`` with probability 1/2 each (bernoulli) or N(0, eps^2)."""
    if kind == "bernoulli":
        return (torch.randint(0, 2, shape, generator=generator).float() * 2 - 1) * eps
    return torch.randn(shape, generator=generator) * eps


class FriendsHook(TrainHook):
    """Optimises the friendly noise on schedule and applies it, plus random noise, from then on."""

    def __init__(self, cfg: FriendsConfig, seed: int) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.noisy: ImageSet | None = None
        """The training set with friendly noise (ids and labels of the full set), once optimised."""
        self.generated_at: list[int] = []
        """Epochs (1-based) at which the noise was optimised."""
        self.seconds = 0.0

    def due(self, epoch: int) -> bool:
        """Whether the friendly noise is optimised before epoch ``epoch`` (1-based)."""
        since = epoch_index(epoch) - self.cfg.begin_epoch
        if since < 0:
            return False
        return since == 0 or (self.cfg.refresh_every > 0 and since % self.cfg.refresh_every == 0)

    def on_epoch_start(self, epoch: int, data: ImageSet, model: nn.Module) -> ImageSet:
        if self.due(epoch):
            tick = time.perf_counter()
            images, magnitude = friendly_images(model, data, self.cfg, self.generator)
            self.noisy = data.replace(images=images)
            self.seconds += time.perf_counter() - tick
            self.generated_at.append(epoch)
            log.info("FRIENDS: friendly noise for %d images at epoch %d (%.1fs, mean |e| %.4f = %.2f/255)",
                     len(data), epoch, time.perf_counter() - tick, magnitude, magnitude * 255)
        if self.noisy is None:
            return data
        return self.noisy.take(self.noisy.positions(data.ids))

    def on_batch(self, x: Tensor, ids: Tensor, generator: torch.Generator) -> Tensor:
        if self.noisy is None:
            return x
        noise = random_noise(x.shape, self.cfg.random_noise, self.cfg.noise_eps, generator)
        return x + noise.to(x.device)

    def summary(self) -> dict[str, float]:
        return {"defense_seconds": self.seconds, "friendly_rounds": float(len(self.generated_at))}


class Friends(TrainingTimeDefense):
    """TrainingDefense: FRIENDS-B or FRIENDS-G."""

    def hooks(self, *, seed: int) -> list[TrainHook]:
        return [FriendsHook(self.cfg, seed)]


@DEFENSES.register("friends_b", FriendsConfig)
def build_friends_b(cfg: FriendsConfig) -> Friends:
    return Friends(cfg)


@DEFENSES.register("friends_g", FriendsGaussianConfig)
def build_friends_g(cfg: FriendsGaussianConfig) -> Friends:
    return Friends(cfg)
