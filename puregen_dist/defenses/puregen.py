"""PureGen data defenses: purify every training image with generative-model dynamics before training.

Paper: "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model Dynamics"
(Bhat, Jiang, Pooladzandi, Branch, Pottie; NeurIPS 2024), https://arxiv.org/abs/2405.18627.

- ``puregen_ebm``: T_EBM Langevin steps on a trained EBM (150 from scratch; 500 / 1000 for transfer).
- ``puregen_ddpm``: noise to t = T_D and T_D ancestral reverse steps of a DDPM trained on t < 250 (75; 125).
- ``puregen_naive``: EBM then DDPM once, T = [150, 75, 1].
- ``puregen_reps``: alternate EBM and DDPM T_reps times, T = [10, 50, 5].
- ``puregen_filt``: rank all training images by EBM energy on the unpurified data and purify only the
  highest-energy fraction k (default k = 0.5 with DDPM-125), keeping the rest raw.
Every defense keeps ids, labels and order; per-sample seeding makes it independent of batching.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from puregen_dist.config.errors import UserInputError, check
from puregen_dist.config.generative import DiffusionConfig, LangevinConfig, PureGenConfig
from puregen_dist.data.transforms import to_sym
from puregen_dist.device import resolve_device
from puregen_dist.generative.ddpm import DDPMPurifier, load_ddpm
from puregen_dist.generative.purifiers import ChainPurifier, EBMPurifier, load_ebm, purify_imageset
from puregen_dist.protocols import Purifier
from puregen_dist.registry import DEFENSES
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

EBM_HELP = "required: a checkpoint directory written by `puregen-dist train-ebm`"
DDPM_HELP = "required: a checkpoint directory written by `puregen-dist train-ddpm`, or a local diffusers UNet"


@dataclass(frozen=True, kw_only=True)
class PureGenEBMConfig(PureGenConfig):
    """PureGen-EBM, T = [150, 0, 1]."""

    name: str = "puregen_ebm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ebm is not None, "ebm", EBM_HELP)


@dataclass(frozen=True, kw_only=True)
class PureGenDDPMConfig(PureGenConfig):
    """PureGen-DDPM, T = [0, 75, 1]."""

    name: str = "puregen_ddpm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ddpm is not None, "ddpm", DDPM_HELP)


@dataclass(frozen=True, kw_only=True)
class PureGenNaiveConfig(PureGenConfig):
    """PureGen-Naive, T = [150, 75, 1]."""

    name: str = "puregen_naive"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ebm is not None, "ebm", EBM_HELP)
        check(self.ddpm is not None, "ddpm", DDPM_HELP)


@dataclass(frozen=True, kw_only=True)
class PureGenRepsConfig(PureGenNaiveConfig):
    """PureGen-Reps, T = [10, 50, 5] (P Table 10)."""

    name: str = "puregen_reps"
    langevin: LangevinConfig = field(default_factory=lambda: LangevinConfig(steps=10))
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(steps=50))
    reps: int = 5


@dataclass(frozen=True, kw_only=True)
class PureGenFiltConfig(PureGenConfig):
    """PureGen-Filt, T = [0, 125, 1], k = 0.5: the EBM ranks, the configured stages purify the top-k."""

    rank_by_energy: ClassVar[bool] = True
    name: str = "puregen_filt"
    langevin: LangevinConfig = field(default_factory=lambda: LangevinConfig(steps=0))
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(steps=125))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ebm is not None, "ebm", EBM_HELP + " (it ranks images by energy)")
        check(self.langevin.steps > 0 or (self.ddpm is not None and self.diffusion.steps > 0), "ddpm",
              "puregen_filt needs a purification stage: langevin.steps > 0, or a ddpm with diffusion.steps > 0")


class PureGenDefense:
    """DataDefense around a Purifier: loads the models once (errors name the checkpoint), then purifies."""

    def __init__(self, cfg: PureGenConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.ebm = self.ddpm = None
        stages: list[Purifier] = []
        if cfg.ebm is not None:
            energy, self.ebm_config = load_ebm(cfg.ebm, self.device)
            self.ebm = EBMPurifier(energy, cfg.langevin)
            if cfg.langevin.steps > 0 and not isinstance(cfg, PureGenDDPMConfig):
                stages.append(self.ebm)
        if cfg.ddpm is not None and cfg.diffusion.steps > 0 and not isinstance(cfg, PureGenEBMConfig):
            unet, schedule = load_ddpm(cfg.ddpm, self.device)
            self.ddpm = DDPMPurifier(unet, schedule, cfg.diffusion.steps)
            stages.append(self.ddpm)
        self.purifier: Purifier = stages[0] if len(stages) == 1 and cfg.reps == 1 else ChainPurifier(stages, cfg.reps)

    def validate(self, train: ImageSet) -> None:
        """The generative models must fit the data's image size and channels."""
        h, w, c = train.shape
        if self.ebm is not None and (self.ebm_config.in_channels != c or self.ebm_config.image_size != h):
            raise UserInputError(
                f"defense.ebm: {self.cfg.ebm} was trained on {self.ebm_config.image_size}px images with "
                f"{self.ebm_config.in_channels} channel(s), the data has {h}x{w}x{c}")
        if self.ddpm is not None:
            unet = self.ddpm.unet.config
            size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
            if unet.in_channels != c or size != h:
                raise UserInputError(f"defense.ddpm: {self.cfg.ddpm} is a {size}px UNet with {unet.in_channels} "
                                     f"channel(s), the data has {h}x{w}x{c}")

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        if not self.cfg.rank_by_energy:
            return purify_imageset(self.purifier, train, seed=seed, batch_size=self.cfg.batch_size,
                                   device=self.device)
        return self._apply_filtered(train, seed)

    def _apply_filtered(self, train: ImageSet, seed: int) -> ImageSet:
        """PureGen-Filt: purify only the top-k fraction of images by energy of the unpurified data."""
        energies = self.energies(train)
        k = max(1, int(round(self.cfg.filter_fraction * len(train))))
        top = np.sort(np.argsort(-energies, kind="stable")[:k])
        purified = purify_imageset(self.purifier, train.take(top), seed=seed, batch_size=self.cfg.batch_size,
                                   device=self.device)
        images = train.images.copy()
        images[top] = purified.images
        log.info("puregen_filt: purified the %d highest-energy of %d images", k, len(train))
        return train.replace(images=images)

    def energies(self, data: ImageSet) -> np.ndarray:
        """(N,) EBM energies of ``data`` as given (no purification), in batches."""
        assert self.ebm is not None
        chunks = [self.ebm.energies(to_sym(data.images[i:i + self.cfg.batch_size]))
                  for i in range(0, len(data), self.cfg.batch_size)]
        return torch.cat(chunks).numpy()


@DEFENSES.register("puregen_ebm", PureGenEBMConfig)
def build_puregen_ebm(cfg: PureGenEBMConfig) -> PureGenDefense:
    return PureGenDefense(cfg)


@DEFENSES.register("puregen_ddpm", PureGenDDPMConfig)
def build_puregen_ddpm(cfg: PureGenDDPMConfig) -> PureGenDefense:
    return PureGenDefense(cfg)


@DEFENSES.register("puregen_naive", PureGenNaiveConfig)
def build_puregen_naive(cfg: PureGenNaiveConfig) -> PureGenDefense:
    return PureGenDefense(cfg)


@DEFENSES.register("puregen_reps", PureGenRepsConfig)
def build_puregen_reps(cfg: PureGenRepsConfig) -> PureGenDefense:
    return PureGenDefense(cfg)


@DEFENSES.register("puregen_filt", PureGenFiltConfig)
def build_puregen_filt(cfg: PureGenFiltConfig) -> PureGenDefense:
    return PureGenDefense(cfg)
