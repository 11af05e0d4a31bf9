"""PureGen purification diagnostics: energy distributions and ℓ2 trajectories (PUREGEN_REFERENCE §1.3-§1.4).

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

* Figure 1: histograms of the EBM energy G_θ over clean, poisoned and purified images (:func:`energy_groups`).
* Figure 3: mean per-image ℓ2 distances along purification, ‖x − Ψ_t(x+δ)‖, ‖(x+δ) − Ψ_t(x+δ)‖ and
  ‖x − Ψ_t(x)‖, against EBM Langevin steps (:func:`ebm_l2_trajectories`) or DDPM steps T_D
  (:func:`ddpm_l2_trajectories`). The paper picks its defaults (150 EBM / 75 DDPM steps) where the first
  falls below the second (:meth:`Trajectories.crossing_step`). The EBM trajectories watch the purification
  loop itself through a per-step observer (:class:`L2Observer`), so they end exactly at ``purify``'s output.

All distances are in the generative models' [-1, 1] space: per image ‖·‖₂ over (C, H, W), then mean and
(population, ddof = 0) std over images. Pure torch/numpy: no plotting, no I/O (see :mod:`puregen_dist.plots`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from puregen_dist.data.transforms import to_sym
from puregen_dist.generative.ddpm import DDPMPurifier
from puregen_dist.generative.purifiers import EBMPurifier

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
    """Per-image distances at every recorded step, collected batch by batch."""

    def __init__(self) -> None:
        self.batches: dict[str, list[np.ndarray]] = {name: [] for name in DISTANCES}

    def add(self, distances: Mapping[str, np.ndarray]) -> None:
        """One batch: name -> (R, b) per-image distances at the R recorded steps, for every name of
        :data:`DISTANCES`."""
        for name in DISTANCES:
            self.batches[name].append(distances[name])

    def result(self, steps: Sequence[int]) -> Trajectories:
        distances = {}
        for name, batches in self.batches.items():
            per_image = np.concatenate(batches, axis=1)  # (R, N)
            distances[name] = (per_image.mean(axis=1), per_image.std(axis=1))
        return Trajectories(np.asarray(steps, dtype=np.int64), distances)


class L2Observer:
    """A :class:`~puregen_dist.generative.langevin.StepObserver` recording, at the steps ``record_at``, each
    chain's per-image ℓ2 distances from Ψ_t = clamp(x_t, -1, 1) to two references.

    Args:
        references: name -> (B, C, H, W) images, row b compared with chain b; on the chain's device.
        record_at: the steps t to record, increasing.

    After the chain: ``distances[name]`` is (R, B) float64, R = len(record_at); steps never seen stay NaN.
    """

    def __init__(self, references: Mapping[str, Tensor], record_at: Sequence[int]) -> None:
        self.references = dict(references)
        self.index = {int(t): i for i, t in enumerate(record_at)}
        rows = next(iter(self.references.values())).shape[0]
        self.distances = {name: np.full((len(self.index), rows), np.nan) for name in self.references}

    def __call__(self, step: int, rows: slice, x: Tensor, energy: Tensor | None) -> None:
        i = self.index.get(step)
        if i is None:
            return
        with torch.no_grad():
            purified = x.clamp(-1.0, 1.0)
            for name, reference in self.references.items():
                self.distances[name][i, rows] = _norms(reference[rows], purified)


def _record_steps(total: int, every: int) -> list[int]:
    """0, every, 2·every, … and always ``total`` itself."""
    steps = list(range(0, total + 1, every))
    return steps if steps[-1] == total else steps + [total]


def ebm_l2_trajectories(purifier: EBMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, *, seed: int,
                        every: int = 1, batch_size: int | None = None) -> Trajectories:
    """ℓ2 distances along PureGen-EBM purification (Figure 3, left), recorded every ``every`` Langevin steps.

    The chains on x+δ and on x are those of ``purifier.purify(·, ids, seed=seed)``, watched by an
    :class:`L2Observer`: the same loop, the same per-sample noise streams (so both chains share their noise,
    as they do in purification); the last recorded step is exactly the purified output.

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
        recorder.add(_ebm_batch(purifier, clean[sl], poisoned[sl], ids[sl], seed, steps))
        log.info("EBM ℓ2 trajectories: %d/%d images", min(start + batch_size, n), n)
    return recorder.result(steps)


def _ebm_batch(purifier: EBMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor, seed: int,
               record_at: Sequence[int]) -> dict[str, np.ndarray]:
    """Purify the poisoned and clean images of one batch as one (2B, C, H, W) batch, observed at
    ``record_at``: name -> (R, B) distances."""
    b = clean.shape[0]
    clean, poisoned = clean.to(purifier.device), poisoned.to(purifier.device)
    start = torch.cat([poisoned, clean])
    observer = L2Observer({"clean": torch.cat([clean, clean]), "start": start}, record_at)
    purifier.purify(start, torch.cat([ids, ids]), seed=seed, observer=observer)
    to_clean, to_start = observer.distances["clean"], observer.distances["start"]
    return {D_CLEAN_TO_PURIFIED_POISONED: to_clean[:, :b], D_POISONED_TO_PURIFIED_POISONED: to_start[:, :b],
            D_CLEAN_TO_PURIFIED_CLEAN: to_clean[:, b:]}


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
        per_t = [_ddpm_distances(by_steps, clean[sl], poisoned[sl], ids[sl], seed) for by_steps in purifiers]
        recorder.add({name: np.stack([d[name] for d in per_t]) for name in DISTANCES})
        log.info("DDPM ℓ2 trajectories: %d/%d images", min(start + batch_size, n), n)
    return recorder.result(grid)


def _ddpm_distances(purifier: DDPMPurifier, clean: Tensor, poisoned: Tensor, ids: Tensor,
                    seed: int) -> dict[str, np.ndarray]:
    """One T_D: purify x+δ and x as one batch; name -> (B,) distances."""
    b = clean.shape[0]
    clean, poisoned = clean.to(purifier.device), poisoned.to(purifier.device)
    with torch.no_grad():
        purified = purifier.purify(torch.cat([poisoned, clean]), torch.cat([ids, ids]), seed=seed)
    return {D_CLEAN_TO_PURIFIED_POISONED: _norms(clean, purified[:b]),
            D_POISONED_TO_PURIFIED_POISONED: _norms(poisoned, purified[:b]),
            D_CLEAN_TO_PURIFIED_CLEAN: _norms(clean, purified[b:])}
