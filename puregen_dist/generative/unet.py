"""The DDPM noise-prediction network: a diffusers ``UNet2DModel`` in the sizes of PureGen
(PUREGEN_REFERENCE §2.1), and loading of local diffusers-format checkpoints (e.g. a snapshot of
``google/ddpm-cifar10-32``).

Papers: Ho et al., "Denoising Diffusion Probabilistic Models" (2020), https://arxiv.org/abs/2006.11239;
Bhat et al., "PureGen" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

Layout at 32×32 (the diffusers "butterflies" tutorial layout): six levels 32→16→8→4→2→1, down blocks
Down, Down, Down, Down, AttnDown, Down and the mirrored up blocks Up, AttnUp, Up, Up, Up, Up. Smaller images
keep fewer levels (:func:`_levels`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative.checkpoints import CheckpointError
from puregen_dist.generative.diffusion import DDPMSchedule, EpsModel

log = logging.getLogger(__name__)

BLOCK_OUT_CHANNELS: dict[str, tuple[int, ...]] = {
    "S": (32, 32, 64, 64, 128, 128),
    "M": (64, 64, 128, 128, 256, 256),
    "L": (128, 128, 256, 256, 512, 512),
}
DOWN_BLOCKS = ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D")
UP_BLOCK_OF = {"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}

SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


def _levels(image_size: int) -> int:
    """Resolution levels kept for ``image_size``: the largest L <= 6 such that 2^(L−1) divides the size.

    Each level after the first halves the image, so L levels need image_size divisible by 2^(L−1) (the up path
    must restore the exact sizes, and the image never goes below 1×1). For powers of two this is the largest
    L with 2^(L−1) <= image_size: 32 → 6 (the reference), 16 → 5, 8 → 4; 24 → 4 (24 → 12 → 6 → 3).
    """
    levels = 1
    while levels < len(DOWN_BLOCKS) and image_size % (2 ** levels) == 0:
        levels += 1
    return levels


def _block_types(levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types of the first ``levels`` levels. When truncation drops the attention level
    (levels < 5), the deepest kept level gets the attention block instead, so at least one remains."""
    down = list(DOWN_BLOCKS[:levels])
    if "AttnDownBlock2D" not in down:
        down[-1] = "AttnDownBlock2D"
    up = [UP_BLOCK_OF[block] for block in reversed(down)]
    return tuple(down), tuple(up)


def build_unet(cfg: DDPMConfig) -> UNet2DModel:
    """A freshly initialised UNet2DModel for ``cfg`` (size S/M/L, channels, image size, layers per block).

    The network maps (B, C, H, W) x_t and (B,) int64 timesteps to ε̂ of the same shape (``.sample``).
    Initialisation draws from the global torch RNG: seed it (inside ``torch.random.fork_rng``) to repeat it.
    """
    levels = _levels(cfg.image_size)
    down, up = _block_types(levels)
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=BLOCK_OUT_CHANNELS[cfg.size][:levels],
        down_block_types=down,
        up_block_types=up,
    )


def eps_model(unet: UNet2DModel) -> EpsModel:
    """The UNet as the ε̂ = f(x_t, t) callable of :mod:`puregen_dist.generative.diffusion`."""

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        return unet(x_t, t).sample

    return predict


def count_parameters(unet: UNet2DModel) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in unet.parameters())


# ---------------------------------------------------------------------------------------------- diffusers


def load_diffusers_unet(path: str | Path) -> tuple[UNet2DModel, DDPMSchedule]:
    """Load a LOCAL diffusers-format UNet2DModel and its linear schedule (never downloads).

    ``path`` is either a pipeline snapshot (``unet/`` + ``scheduler/scheduler_config.json``) or a UNet
    directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` + optional
    ``scheduler_config.json``). Without a scheduler config the default schedule (1000 steps, β 1e-4 → 0.02) is
    used. Only safetensors weights are accepted; pickled ``.bin`` weights are refused.

    Raises:
        CheckpointError: missing directory, pickle-only or missing weights, unsupported schedule, failed load.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: DDPM checkpoint directory not found")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    scheduler_file = root / "scheduler" / SCHEDULER_CONFIG if unet_dir != root else root / SCHEDULER_CONFIG
    _check_weights(unet_dir)
    _check_class(unet_dir / "config.json")
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{unet_dir}: cannot load a diffusers UNet2DModel ({exc})") from None
    return unet, _schedule_from(scheduler_file)


def _check_weights(unet_dir: Path) -> None:
    if (unet_dir / SAFETENSORS_WEIGHTS).is_file() or (unet_dir / SAFETENSORS_INDEX).is_file():
        return
    pickles = sorted(p.name for p in unet_dir.glob("*.bin"))
    if pickles:
        raise CheckpointError(f"{unet_dir}: only pickled weights found ({', '.join(pickles)}); only "
                              f"safetensors are accepted (convert once, in a trusted environment, with "
                              f"UNet2DModel.from_pretrained(...).save_pretrained(dir, "
                              f"safe_serialization=True))")
    raise CheckpointError(f"{unet_dir}: no {SAFETENSORS_WEIGHTS} found")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _check_class(config_file: Path) -> None:
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: UNet config not found")
    name = _read_json(config_file).get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise CheckpointError(f"{config_file}: holds a {name!r}, only diffusers UNet2DModel is supported")


def _schedule_from(scheduler_file: Path) -> DDPMSchedule:
    """The linear schedule of a diffusers scheduler config; the diffusers defaults when the file is absent."""
    if not scheduler_file.is_file():
        log.info("%s not found: using the default linear schedule (1000 steps, beta 1e-4 -> 0.02)",
                 scheduler_file)
        return DDPMSchedule.linear()
    config = _read_json(scheduler_file)
    kind = config.get("beta_schedule", "linear")
    if kind != "linear":
        raise CheckpointError(f"{scheduler_file}: beta_schedule {kind!r} is not supported; only 'linear' is")
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{scheduler_file}: trained_betas are not supported; only a linear schedule is")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{scheduler_file}: prediction_type {prediction!r} is not supported; "
                              f"only 'epsilon' is")
    if config.get("variance_type", "fixed_small") != "fixed_small":
        log.warning("%s: variance_type %r ignored; purification uses the posterior variance (fixed_small)",
                    scheduler_file, config["variance_type"])
    try:
        return DDPMSchedule.linear(int(config.get("num_train_timesteps", 1000)),
                                   float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{scheduler_file}: invalid schedule ({exc})") from None
