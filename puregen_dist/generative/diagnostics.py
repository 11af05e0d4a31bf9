"""PureGen purification diagnostics: energy distributions and ℓ2 trajectories (PUREGEN_REFERENCE §1.3-§1.4).

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

* Figure 1: histograms of the EBM energy G_θ over clean, poisoned and purified images (:func:`energy_groups`).
* Figure 3: mean per-image ℓ2 distances along purification, ‖x − Ψ_t(x+δ)‖, ‖(x+δ) − Ψ_t(x+δ)‖ and
  ‖x − Ψ_t(x)‖, against EBM Langevin steps (:func:`ebm_l2_trajectories`) or DDPM steps T_D
  (:func:`ddpm_l2_trajectories`). The paper picks its defaults (150 EBM / 75 DDPM steps) where the first
  falls below the second (:meth:`Trajectories.crossing_step`).

All distances are in the generative models' [-1, 1] space: per image ‖·‖₂ over (C, H, W), then mean and
(population, ddof = 0) std over images. Pure torch/numpy: no plotting, no I/O (see :mod:`puregen_dist.plots`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from puregen_dist.data.transforms import to_sym
from puregen_dist.generative.ddpm import DDPMPurifier
from puregen_dist.generative.langevin import check_finite, langevin_step
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise
from puregen_dist.generative.purifiers import FINITE_CHECK_EVERY, EBMPurifier

log = logging.getLogger(__name__)

D_CLEAN_TO_PURIFIED_POISONED = "d_clean_to_purified_poisoned"
"""‖x − Ψ_t(x+δ)‖: how far purification takes a poisoned image from its clean original."""
D_POISONED_TO_PURIFIED_POISONED = "d_poisoned_to_purified_poisoned"
"""‖(x+δ) − Ψ_t(x+δ)‖: how far purification moved the poisoned image."""
D_CLEAN_TO_PURIFIED_CLEAN = "d_clean_to_purified_clean"
"""‖x − Ψ_t(x)‖: how far purification moves a clean image."""
DISTANCES = (D_CLEAN_TO_PURIFIED_POISONED, D_POISONED_TO_PURIFIED_POISONED, D_CLEAN_TO_PURIFIED_CLEAN)


@dataclass(frozen=True, eq=False)
class Trajectories:
    """ℓ2 distances recorded at purification steps.

    Attributes:
        steps: (R,) int, the recorded step counts t (Langevin steps or DDPM T_D), increasing.
        distances: name -> (mean (R,), std (R,)) over images, float64; names are :data:`DISTANCES`.
    """

    steps: np.ndarray
    distances: dict[str, tuple[np.ndarray, np.ndarray]]

    def __post_init__(self) -> None:
        n = len(self.steps)
        for name, (mean, std) in self.distances.items():
            if len(mean) != n or len(std) != n:
                raise ValueError(f"Trajectories[{name!r}]: {len(mean)} means and {len(std)} stds "
                                 f"for {n} steps")

    def mean(self, name: str) -> np.ndarray:
        """(R,) mean distance ``name`` at each recorded step."""
        return self.distances[name][0]

    def crossing_step(self) -> int | None:
        """First recorded t with ‖x − Ψ_t(x+δ)‖ < ‖(x+δ) − Ψ_t(x+δ)‖ (means over images), None if never.

        The paper (§3.4, Figure 3) reports ≈150 EBM Langevin steps and ≈75 DDPM steps.
        """
        below = self.mean(D_CLEAN_TO_PURIFIED_POISONED) < self.mean(D_POISONED_TO_PURIFIED_POISONED)
        hits = np.flatnonzero(below)
        return int(self.steps[hits[0]]) if len(hits) else None

    def as_rows(self) -> list[dict[str, Any]]:
        """One dict per recorded step: ``step`` then ``<name>_mean`` and ``<name>_std`` (Python scalars)."""
        rows = []
        for i, step in enumerate(self.steps):
            row: dict[str, Any] = {"step": int(step)}
            for name, (mean, std) in self.distances.items():
                row[f"{name}_mean"] = float(mean[i])
                row[f"{name}_std"] = float(std[i])
            rows.append(row)
        return rows


# --------------------------------------------------------------------------------------------------- energies


def energy_groups(purifier: EBMPurifier, groups: Mapping[str, np.ndarray],
                  batch_size: int = 128) -> dict[str, np.ndarray]:
    """G_θ of every image of every group (Figure 1), no augmentation, in [-1, 1] space.

    Args:
        purifier: supplies the energy network (``purifier.energies``).
        groups: name (e.g. "clean", "poisoned", "purified") -> (N, H, W, C) uint8 images.
        batch_size: images per forward pass.

    Returns:
        name -> (N,) float32 energies, in the order of ``groups``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = {}
    for name, images in groups.items():
        parts = [purifier.energies(to_sym(images[i:i + batch_size])).numpy()
                 for i in range(0, len(images), batch_size)]
        out[name] = np.concatenate(parts) if parts else np.empty(0, np.float32)
        log.info("energies of %r: %d images", name, len(out[name]))
    return out


# ------------------------------------------------------------------------------------------- ℓ2 trajectories


def _norms(a: Tensor, b: Tensor) -> np.ndarray:
    """(B,) float64 per-image ‖a − b‖₂ over (C, H, W)."""
    return torch.linalg.vector_norm((a - b).flatten(1).double(), dim=1).cpu().numpy()


def _check_pair(clean: Tensor, poisoned: Tensor, ids: Tensor) -> None:
    if clean.shape != poisoned.shape or clean.dim() != 4 or ids.shape != (clean.shape[0],):
        raise ValueError(f"need clean and poisoned (B, C, H, W) of one shape and ids (B,), got "
                         f"{tuple(clean.shape)}, {tuple(poisoned.shape)} and {tuple(ids.shape)}")
    if clean.shape[0] == 0:
        raise ValueError("no images to diagnose")


class _Recorder:
    """Per-image distances of one batch, accumulated step by step, then concatenated over batches."""

    def __init__(self) -> None:
        self.values: dict[str, list[list[np.ndarray]]] = {name: [] for name in DISTANCES}

    def start_batch(self) -> None:
        for per_step in self.values.values():
            per_step.append([])

    def record(self, clean: Tensor, poisoned: Tensor, purified_poisoned: Tensor,
               purified_clean: Tensor) -> None:
        """All (B, C, H, W) on one device, [-1, 1] space."""
        current = {D_CLEAN_TO_PURIFIED_POISONED: _norms(clean, purified_poisoned),
                   D_POISONED_TO_PURIFIED_POISONED: _norms(poisoned, purified_poisoned),
                   D_CLEAN_TO_PURIFIED_CLEAN: _norms(clean, purified_clean)}
        for name, norms in current.items():
            self.values[name][-1].append(norms)

    def result(self, steps: Sequence[int]) -> Trajectories:
        distances = {}
        for name, batches in self.values.items():
            per_image = np.concatenate([np.stack(b) for b in batches], axis=1)  # (R, N)
            distances[name] = (per_image.mean(axis=1), per_image.std(axis=1))
        return Trajectories(np.asarray(steps, dtype=np.int64), distances)


def langevin_states(purifier: EBMPurifier, x: Tensor, ids: Tensor, *,
                    seed: int) -> Iterator[tuple[int, Tensor]]:
    """The chain of :meth:`EBMPurifier.purify`, state by state: yields (t, x_t) for t = 0 … steps.

    x_t is the unclamped state after t Langevin updates (x_0 = x on the purifier's device); the purified
    image after t steps is Ψ_t(x) = x_t.clamp(-1, 1), which is what ``purify`` returns for ``steps = t``.

    Noise: one ``SampleNoise(ids, seed, STREAM_LANGEVIN).randn`` draw per step, i.e. the per-step draws of
    ``EBMPurifier.purify`` (which exposes no per-step hook). The unit tests check that the final state
    reproduces ``purify``; if ``purify`` ever draws its noise another way, those tests fail.
    """
    cfg = purifier.langevin
    noise = SampleNoise(ids, seed, STREAM_LANGEVIN)
    x = x.to(purifier.device)
    yield 0, x
    for step in range(cfg.steps):
        z = noise.randn(tuple(x.shape[1:]), x.device, x.dtype)
        x, energy, grad = langevin_step(purifier.energy, x, cfg.step_size, cfg.temperature, z)
        if (step + 1) % FINITE_CHECK_EVERY == 0 or step + 1 == cfg.steps:
            check_finite(energy, grad, where=f"diagnostic Langevin step {step + 1}", ids=ids)
        yield step + 1, x


def _record_steps(total: int, every: int) -> list[int]:
    """0, every, 2·every, … and always ``total`` itself."""
    steps = list(range(0, total + 1, every))
    return steps if steps[-1] == total else steps + [total]


def ebm_l2_trajectories(purifier: EBMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, *, seed: int,
                        every: int = 1, batch_size: int | None = None) -> Trajectories:
    """ℓ2 distances along PureGen-EBM purification (Figure 3, left), recorded every ``every`` Langevin steps.

    The chains on x+δ and on x are those of ``purifier.purify(·, ids, seed=seed)`` (same per-sample noise
    streams, so both chains share their noise, as they do in purification); see :func:`langevin_states`.

    Args:
        purifier: the EBM and its Langevin setting (``purifier.langevin.steps`` is the last recorded t).
        clean: (N, C, H, W) x in [-1, 1].
        poisoned: (N, C, H, W) x+δ in [-1, 1].
        ids: (N,) int64 sample ids (the noise streams).
        seed: purification seed.
        every: record t = 0, every, 2·every, …, and the last step.
        batch_size: images per chain batch (each batch runs 2·batch_size chains); None = all at once.

    Returns:
        :class:`Trajectories` over the N images.
    """
    _check_pair(clean, poisoned, ids)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    n = clean.shape[0]
    batch_size = batch_size or max(n, 1)
    steps = _record_steps(purifier.langevin.steps, every)
    recorder = _Recorder()
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        _ebm_batch(purifier, clean[sl], poisoned[sl], ids[sl], seed, set(steps), recorder)
        log.info("EBM ℓ2 trajectories: %d/%d images", min(start + batch_size, n), n)
    return recorder.result(steps)


def _ebm_batch(purifier: EBMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, seed: int,
               record_at: set[int], recorder: _Recorder) -> None:
    """Run the poisoned and clean chains of one batch as one (2B, C, H, W) chain and record distances."""
    b = clean.shape[0]
    device = purifier.device
    clean, poisoned = clean.to(device), poisoned.to(device)
    recorder.start_batch()
    for t, state in langevin_states(purifier, torch.cat([poisoned, clean]), torch.cat([ids, ids]), seed=seed):
        if t in record_at:
            with torch.no_grad():
                purified = state.clamp(-1.0, 1.0)
                recorder.record(clean, poisoned, purified[:b], purified[b:])


def ddpm_l2_trajectories(purifier: DDPMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, *, seed: int,
                         steps_grid: Sequence[int], batch_size: int | None = None) -> Trajectories:
    """ℓ2 distances of PureGen-DDPM purification against T_D (Figure 3, right).

    Each T_D is a fresh purification (noise to T_D, T_D reverse steps) by a ``DDPMPurifier`` sharing
    ``purifier``'s UNet and schedule, seeded by (seed, id) like ``purify``: x+δ and x get the same noise.

    Args:
        purifier: the UNet and schedule (its own ``steps`` is not used).
        clean: (N, C, H, W) x in [-1, 1].
        poisoned: (N, C, H, W) x+δ in [-1, 1].
        ids: (N,) int64 sample ids.
        seed: purification seed.
        steps_grid: the T_D values; sorted and de-duplicated; each in [0, N_train − 1].
        batch_size: images per batch (each batch purifies 2·batch_size images); None = all at once.

    Returns:
        :class:`Trajectories` with ``steps`` = the sorted grid.
    """
    _check_pair(clean, poisoned, ids)
    grid = sorted({int(t) for t in steps_grid})
    if not grid:
        raise ValueError("steps_grid is empty")
    purifiers = [DDPMPurifier(purifier.unet, purifier.schedule, steps=t) for t in grid]
    n = clean.shape[0]
    batch_size = batch_size or max(n, 1)
    recorder = _Recorder()
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        recorder.start_batch()
        for by_steps in purifiers:
            _ddpm_record(by_steps, clean[sl], poisoned[sl], ids[sl], seed, recorder)
        log.info("DDPM ℓ2 trajectories: %d/%d images", min(start + batch_size, n), n)
    return recorder.result(grid)


def _ddpm_record(purifier: DDPMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, seed: int,
                 recorder: _Recorder) -> None:
    b = clean.shape[0]
    clean, poisoned = clean.to(purifier.device), poisoned.to(purifier.device)
    with torch.no_grad():
        purified = purifier.purify(torch.cat([poisoned, clean]), torch.cat([ids, ids]), seed=seed)
        recorder.record(clean, poisoned, purified[:b], purified[b:])
