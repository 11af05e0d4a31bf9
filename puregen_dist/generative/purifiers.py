"""Purifiers (the ``Purifier`` protocol): pure, on one device, (B, C, H, W) float in [-1, 1] -> same.

PureGen-EBM runs Langevin dynamics from the image itself (zero initial noise, §1.3); chains of purifiers give
PureGen-Naive (EBM then DDPM) and PureGen-Reps (alternate T_reps times) (§3). Every random draw comes from
per-sample streams seeded by (seed, sample id), so outputs do not depend on batching.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.config.errors import ConfigError
from puregen_dist.config.generative import EBMConfig, LangevinConfig
from puregen_dist.config.loading import build
from puregen_dist.data.transforms import sym_to_uint8, to_sym
from puregen_dist.generative.checkpoints import CheckpointError, load_state, read_checkpoint_config
from puregen_dist.generative.ebm import build_ebm
from puregen_dist.generative.langevin import StepObserver
from puregen_dist.generative.langevin_fast import fast_energy, langevin_purify, micro_batch_size
from puregen_dist.protocols import Purifier
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

FINITE_CHECK_EVERY = 10
"""Langevin steps between NaN/Inf checks (each check synchronises an accelerator)."""


class EBMPurifier:
    """Ψ_T of PureGen-EBM: ``steps`` Langevin updates of §1.3 starting at the image, clamped to [-1, 1] at
    the end.

    The chain runs through ``langevin_purify`` on a ``fast_energy`` copy of the network (same function,
    channels-last / pool-folded where faster), in fixed-size micro-batches: outputs are bit-identical however
    the images are batched or ordered. An optional :class:`StepObserver` watches the chain (diagnostics).

    Args:
        energy: G_θ, (B, C, H, W) -> (B,); put in eval mode with gradients off for its parameters.
        langevin: ε, T and the number of steps.
    """

    def __init__(self, energy: nn.Module, langevin: LangevinConfig) -> None:
        self.energy = energy.eval().requires_grad_(False)
        self.langevin = langevin

    @property
    def device(self) -> torch.device:
        return next(self.energy.parameters()).device

    def purify(self, x: Tensor, ids: Tensor, *, seed: int, observer: StepObserver | None = None) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, C, H, W) in [-1, 1]; noise per sample from (seed, id).

        ``observer`` (optional) sees the unclamped states x_0 … x_steps of every row as the chain runs
        (``langevin_purify``); the output is clamp(x_steps, -1, 1) with or without it, bit for bit.
        """
        cfg = self.langevin
        x = x.to(self.device)
        if cfg.steps == 0 or x.shape[0] == 0:
            if observer is not None and x.shape[0]:
                observer(0, slice(0, x.shape[0]), x, None)
            return x.clamp(-1.0, 1.0)
        y = langevin_purify(fast_energy(self.energy), x, torch.as_tensor(ids), seed=seed, steps=cfg.steps,
                            step_size=cfg.step_size, temperature=cfg.temperature,
                            check_every=FINITE_CHECK_EVERY, rows=micro_batch_size(self.energy, x),
                            precision=cfg.precision, cuda_graph=cfg.cuda_graph, observer=observer)
        return y.clamp_(-1.0, 1.0)

    def energies(self, x: Tensor) -> Tensor:
        """G(x) (B,) for (B, C, H, W) in [-1, 1]."""
        with torch.no_grad():
            return self.energy(x.to(self.device)).float().cpu()


class ChainPurifier:
    """Apply ``purifiers`` in order, ``reps`` times (PureGen-Naive: reps = 1; PureGen-Reps: reps > 1).
    Repetition r draws its noise with a seed derived from (seed, r), so repetitions never reuse numbers."""

    def __init__(self, purifiers: Sequence[Purifier], reps: int = 1) -> None:
        self.purifiers = list(purifiers)
        self.reps = reps

    def purify(self, x: Tensor, ids: Tensor, *, seed: int) -> Tensor:
        for rep in range(self.reps):
            rep_seed = seed if rep == 0 else int(np.random.SeedSequence([seed, rep]).generate_state(1)[0])
            for purifier in self.purifiers:
                x = purifier.purify(x, ids, seed=rep_seed)
        return x


def purify_imageset(purifier: Purifier, data: ImageSet, *, seed: int, batch_size: int,
                    device: torch.device | None = None) -> ImageSet:
    """Run ``purifier`` over every image of ``data`` in batches (uint8 in, uint8 out: clamped and rounded).
    Ids, labels and order are preserved; the result does not depend on ``batch_size``."""
    out = np.empty_like(data.images)
    for start in range(0, len(data), batch_size):
        stop = min(start + batch_size, len(data))
        x = to_sym(data.images[start:stop])
        ids = torch.tensor(data.ids[start:stop])  # a copy: ids read from Arrow are read-only arrays
        y = purifier.purify(x if device is None else x.to(device), ids, seed=seed)
        out[start:stop] = sym_to_uint8(y)
        log.info("purified %d/%d images", stop, len(data))
    return data.replace(images=out)


def load_ebm(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, EBMConfig]:
    """Build the EBM described by a ``train-ebm`` checkpoint directory and load its weights (checked)."""
    config = read_checkpoint_config(path)
    try:
        cfg = build(EBMConfig, config["model"], source=str(Path(path) / "config.json"), path="model")
    except ConfigError as exc:
        raise CheckpointError(f"invalid EBM config: {exc}") from None
    model = build_ebm(cfg)
    load_state(path, model, kind="ebm")
    return model.to(device).eval(), cfg
