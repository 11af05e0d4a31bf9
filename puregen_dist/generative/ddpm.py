"""PureGen-DDPM purifier and DDPM checkpoint loading (PUREGEN_REFERENCE §2.3).

Papers: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627; Ho et al., "Denoising Diffusion Probabilistic
Models" (2020), https://arxiv.org/abs/2006.11239.

Purification noises each image to timestep T_D and runs T_D ancestral reverse steps with x̂₀ clipping
(:func:`~puregen_dist.generative.diffusion.diffusion_purify`); all noise is per sample, seeded by (seed, id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from puregen_dist.config.errors import ConfigError
from puregen_dist.config.generative import DDPMConfig
from puregen_dist.config.loading import build
from puregen_dist.generative.checkpoints import CONFIG, CheckpointError, load_state, read_checkpoint_config
from puregen_dist.generative.diffusion import DDPMSchedule, check_steps, diffusion_purify
from puregen_dist.generative.unet import build_unet, eps_model, load_diffusers_unet

if TYPE_CHECKING:
    from diffusers import UNet2DModel

KIND = "ddpm"
"""The ``kind`` of puregen-dist DDPM checkpoints (``config.json``)."""


class DDPMPurifier:
    """Ψ_{T_D} of PureGen-DDPM (implements the ``Purifier`` protocol).

    Args:
        unet: the ε-prediction UNet; put in eval mode with its parameters frozen. Purification runs on its
            device.
        schedule: the schedule the UNet was trained with.
        steps: T_D, in [0, N − 1] (75 from scratch, 125 for transfer in the paper).
    """

    def __init__(self, unet: UNet2DModel, schedule: DDPMSchedule, steps: int) -> None:
        check_steps(steps, schedule)
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule.to(self.device)
        self.steps = steps

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def purify(self, x: Tensor, ids: Tensor, *, seed: int) -> Tensor:
        """(B, C, H, W) float in [-1, 1] -> (B, C, H, W) float in [-1, 1] on the UNet's device.

        Output b depends only on (x[b], ids[b], seed), not on the rest of the batch.
        """
        return diffusion_purify(eps_model(self.unet), x.to(self.device), ids, steps=self.steps,
                                schedule=self.schedule, seed=seed)


def is_puregen_checkpoint(path: str | Path) -> bool:
    """True when ``path/config.json`` is ours (a JSON object with a top-level ``kind``), False for anything
    else (diffusers' UNet config has ``_class_name`` instead; pipeline snapshots have no root config.json)."""
    config_file = Path(path) / CONFIG
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "kind" in config


def load_ddpm(path: str | Path, device: torch.device | str = "cpu") -> tuple[UNet2DModel, DDPMSchedule]:
    """Load a DDPM for purification: a ``train-ddpm`` checkpoint directory or a local diffusers directory.

    Returns:
        (unet in eval mode on ``device``, its schedule on ``device``).

    Raises:
        CheckpointError: missing path, wrong kind, invalid config, tensors that do not fit the architecture,
            pickle-only diffusers weights, unsupported diffusers schedule.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: DDPM checkpoint directory not found")
    if is_puregen_checkpoint(path):
        unet, schedule = _load_puregen(path)
    else:
        unet, schedule = load_diffusers_unet(path)
    return unet.to(device).eval(), schedule.to(device)


def _load_puregen(path: Path) -> tuple[UNet2DModel, DDPMSchedule]:
    config = read_checkpoint_config(path)
    if config["kind"] != KIND:
        raise CheckpointError(f"{path / CONFIG}: checkpoint holds a {config['kind']!r} model, "
                              f"expected {KIND!r}")
    try:
        cfg = build(DDPMConfig, config["model"], source=str(path / CONFIG), path="model")
    except ConfigError as exc:
        raise CheckpointError(f"invalid DDPM config: {exc}") from None
    unet = build_unet(cfg)
    load_state(path, unet, kind=KIND)
    return unet, DDPMSchedule.from_config(cfg)
