"""Trigger survival: how much of a perturbation δ passes through purification Ψ.

    ρ = ⟨Ψ(x+δ) − Ψ(x), δ⟩ / ‖δ‖²      (per image; 1: δ passes untouched, 0: removed, < 0: reversed)

Ψ(x+δ) and Ψ(x) run with the same per-sample noise (same ids and seed), so ρ measures what the dynamics do to δ,
not the difference of two noise draws. Beside it, the relative change of clean images ‖Ψ(x) − x‖ / ‖x‖ (pixel
units in [0, 1]) is the price paid: a purifier that blurs everything has low ρ and a high clean change.

Perturbation families (pixel units, L∞ = eps, applied as x+δ clipped to the valid range, so the δ that enters ρ is
the effective one):

* ``sign``: an independent ±eps per pixel and channel (high-frequency noise, which any blur removes);
* ``smooth<k>`` (e.g. ``smooth4``, ``smooth8``): Gaussian noise on a k×k grid per channel, bilinearly upsampled to
  the image size and scaled to L∞ = eps (smooth, natural-looking perturbations, like clean-label triggers);
* ``attack``: the perturbations an attack crafted (poisoned − clean rows), e.g. a BadNets patch or additive sign pattern.

Random patterns are drawn per image from generators seeded by (seed, id, family), so they do not depend on
batching. Pure torch/numpy: no plotting, no I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from puregen_dist.generative.ddpm import DDPMPurifier
from puregen_dist.generative.purifiers import EBMPurifier

log = logging.getLogger(__name__)

PATTERN_RE = re.compile(r"sign|smooth([1-9][0-9]*)|attack")
"""Valid pattern names: ``sign``, ``smooth<k>`` (k >= 1 cells per side), ``attack``."""
CLEAN = "clean"


# ------------------------------------------------------------------------------------------ perturbations


def _generator(seed: int, sample_id: int, family: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(sample_id)) * 101 + family)


def sign_pattern(ids: Sequence[int], shape: tuple[int, int, int], eps: float, *, seed: int) -> Tensor:
    """(N, C, H, W) float32: ±eps per element, independently per image (seeded by (seed, id))."""
    return torch.stack([(torch.randint(0, 2, shape, generator=_generator(seed, i, 1)) * 2 - 1).float() * eps
                        for i in ids]) if len(ids) else torch.zeros((0, *shape))


def smooth_pattern(ids: Sequence[int], shape: tuple[int, int, int], eps: float, cells: int, *,
                   seed: int) -> Tensor:
    """(N, C, H, W) float32: per image and channel, N(0, 1) on a ``cells``×``cells`` grid, bilinearly upsampled
    to (H, W) (align_corners=False) and scaled to L∞ = eps over the image."""
    c, h, w = shape
    if len(ids) == 0:
        return torch.zeros((0, *shape))
    coarse = torch.stack([torch.randn((c, cells, cells), generator=_generator(seed, i, 2 + cells)) for i in ids])
    fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    peak = fine.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return fine / peak * eps


def make_pattern(name: str, ids: Sequence[int], shape: tuple[int, int, int], eps: float, *, seed: int) -> Tensor:
    """The random pattern ``name`` (``sign`` or ``smooth<k>``) for images ``ids``; (N, C, H, W) pixel units."""
    match = PATTERN_RE.fullmatch(name)
    if match is None or name == "attack":
        raise ValueError(f"unknown random pattern {name!r}; expected sign or smooth<k>")
    if name == "sign":
        return sign_pattern(ids, shape, eps, seed=seed)
    return smooth_pattern(ids, shape, eps, int(match.group(1)), seed=seed)


def perturb(x_sym: Tensor, delta_unit: Tensor) -> Tensor:
    """x+δ clipped to the valid range: x (N, C, H, W) in [-1, 1], δ in [0, 1] pixel units -> [-1, 1]."""
    return (x_sym + 2.0 * delta_unit).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------ statistics


def survival(purified_clean: Tensor, purified_perturbed: Tensor, delta: Tensor) -> np.ndarray:
    """(N,) float64 ρ_i = ⟨Ψ(x_i+δ_i) − Ψ(x_i), δ_i⟩ / ‖δ_i‖² (any common units); NaN where δ_i = 0."""
    d = delta.flatten(1).double()
    moved = (purified_perturbed - purified_clean).flatten(1).double()
    energy = (d * d).sum(dim=1)
    rho = (moved * d).sum(dim=1) / energy.clamp_min(1e-300)
    rho[energy == 0] = float("nan")
    return rho.cpu().numpy()


def gaussian_survival(covariance: Tensor | tuple[Tensor, Tensor], alpha_bar: float, delta: Tensor) -> np.ndarray:
    """(N,) float64 ρ of the *ideal DDPM of a Gaussian fit* of the data, a yardstick for ρ at a noise level.

    If the images were Gaussian, x ~ N(μ, Σ), a DDPM with the exact score is an exact posterior sampler: noising
    to ᾱ and running the reverse chain with the same noise maps x and x+δ to outputs that differ by the
    posterior-mean gain, Ψ(x+δ) − Ψ(x) = ᾱ Σ (ᾱΣ + (1−ᾱ) I)⁻¹ δ, for every x. So, with Σ = V diag(λ) Vᵀ and
    s = (1−ᾱ)/ᾱ,  ρ = Σ_k λ_k/(λ_k + s) ⟨v_k, δ⟩² / ‖δ‖²: a direction survives as far as the data vary along it
    more than the noise hides it. A model that knows only the data's second moments keeps this much of δ; a
    lower ρ needs the non-Gaussian structure of images. Clipping of x+δ is ignored.

    Args:
        covariance: (D, D) covariance of the images in [-1, 1] space, D = C·H·W, or its eigendecomposition
            ``(eigenvalues (D,), eigenvectors (D, D))`` from :func:`covariance_spectrum`, computed once for many
            calls (an eigendecomposition of CIFAR-10's 3072×3072 covariance takes seconds).
        alpha_bar: ᾱ at the purification's noise level (``DDPMSchedule.alpha_bar(T_D)``), in (0, 1].
        delta: (N, C, H, W) perturbations (any units; ρ is scale-free).
    """
    if not 0.0 < alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must lie in (0, 1], got {alpha_bar}")
    d = delta.flatten(1).double()
    eigenvalues, eigenvectors = covariance if isinstance(covariance, tuple) else covariance_spectrum(covariance)
    if eigenvectors.shape != (d.shape[1], d.shape[1]):
        raise ValueError(f"covariance shape {tuple(eigenvectors.shape)} does not match perturbations of "
                         f"{d.shape[1]} values")
    variance, noise = eigenvalues.clamp_min(0.0), (1.0 - alpha_bar) / alpha_bar
    gain = variance / (variance + noise) if noise > 0 else torch.ones_like(variance)  # ᾱ = 1: nothing is noised
    coefficients = d @ eigenvectors
    energy = (d * d).sum(dim=1)
    rho = ((coefficients ** 2) * gain).sum(dim=1) / energy.clamp_min(1e-300)
    rho[energy == 0] = float("nan")
    return rho.numpy()


def covariance_spectrum(covariance: Tensor) -> tuple[Tensor, Tensor]:
    """(eigenvalues (D,), eigenvectors (D, D) as columns), float64, of a symmetric (D, D) covariance."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    return eigenvalues, eigenvectors


def image_covariance(x_sym: Tensor) -> Tensor:
    """(D, D) float64 covariance of images (N, C, H, W) in [-1, 1] (unbiased, over the N images)."""
    flat = x_sym.flatten(1).double()
    centred = flat - flat.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(flat.shape[0] - 1, 1)


def relative_change(clean_sym: Tensor, purified_sym: Tensor) -> np.ndarray:
    """(N,) float64 ‖Ψ(x) − x‖₂ / ‖x‖₂ with both in [0, 1] pixel units."""
    x = (clean_sym.flatten(1).double() + 1.0) / 2.0
    y = (purified_sym.flatten(1).double() + 1.0) / 2.0
    return ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).cpu().numpy()


@dataclass(frozen=True, eq=False)
class SurvivalCurve:
    """ρ and the clean change at purification steps t (Langevin steps or DDPM T_D).

    Attributes:
        steps: (R,) int64, increasing.
        rho: pattern -> (R, N) per-image ρ (NaN where a δ was zero).
        clean_change: (R, N) per-image relative change of the clean images.
    """

    steps: np.ndarray
    rho: dict[str, np.ndarray]
    clean_change: np.ndarray

    def mean_rho(self, pattern: str) -> np.ndarray:
        """(R,) mean ρ over the images of ``pattern`` (NaN-safe)."""
        return np.nanmean(self.rho[pattern], axis=1)

    def at(self, step: int) -> dict[str, float]:
        """``{"rho_<pattern>": mean ρ, "clean_change": mean}`` at recorded step ``step``."""
        i = int(np.flatnonzero(self.steps == step)[0])
        out = {f"rho_{name}": float(np.nanmean(values[i])) for name, values in self.rho.items()}
        out["clean_change"] = float(self.clean_change[i].mean())
        return out

    def as_rows(self, model: str) -> list[dict[str, Any]]:
        """One row per (pattern, step): mean/std of ρ and of the clean change (for CSV)."""
        rows = []
        for name, values in self.rho.items():
            for i, step in enumerate(self.steps):
                rows.append({"model": model, "pattern": name, "step": int(step),
                             "rho_mean": float(np.nanmean(values[i])), "rho_std": float(np.nanstd(values[i])),
                             "clean_change_mean": float(self.clean_change[i].mean()),
                             "clean_change_std": float(self.clean_change[i].std())})
        return rows


# ------------------------------------------------------------------------------------------ EBM


class StateObserver:
    """A :class:`~puregen_dist.generative.langevin.StepObserver` keeping Ψ_t = clamp(x_t, −1, 1) of every chain
    at the steps ``record_at``: ``states`` is (R, B, C, H, W) on the chains' device."""

    def __init__(self, like: Tensor, record_at: Sequence[int]) -> None:
        self.index = {int(t): i for i, t in enumerate(record_at)}
        self.states = torch.full((len(self.index), *like.shape), float("nan"), device=like.device)

    def __call__(self, step: int, rows: slice, x: Tensor, energy: Tensor | None) -> None:
        i = self.index.get(step)
        if i is not None:
            self.states[i, rows] = x.detach().clamp(-1.0, 1.0)


def ebm_survival(purifier: EBMPurifier, clean: Tensor, deltas: Mapping[str, Tensor], ids: Tensor, *,
                 seed: int, record_at: Sequence[int], batch_size: int | None = None) -> SurvivalCurve:
    """ρ of each perturbation family along PureGen-EBM purification, at the Langevin steps ``record_at``.

    One purification per batch runs the clean chains and every perturbed chain together (ids repeated, so all
    chains of an image share its noise stream), watched by a :class:`StateObserver`: the states at the last
    step are exactly ``purify``'s outputs.

    Args:
        purifier: the EBM and its Langevin setting (runs ``max(record_at)`` steps).
        clean: (N, C, H, W) x in [-1, 1].
        deltas: pattern -> (N, C, H, W) δ in [0, 1] pixel units (clipped into the valid range here).
        ids: (N,) int64 sample ids.
        seed: purification seed.
        record_at: Langevin steps t at which ρ is measured.
        batch_size: images per batch (each runs (1 + patterns)·batch_size chains); None = all at once.
    """
    steps = sorted({int(t) for t in record_at})
    run = EBMPurifier(purifier.energy, dataclasses.replace(purifier.langevin, steps=steps[-1]))

    def purify_batch(chains: Tensor, chain_ids: Tensor) -> Tensor:
        observer = StateObserver(chains, steps)
        run.purify(chains, chain_ids, seed=seed, observer=observer)
        return observer.states

    return _survival_curve(purify_batch, clean, deltas, ids, steps, batch_size, "EBM")


# ------------------------------------------------------------------------------------------ DDPM


def ddpm_survival(purifier: DDPMPurifier, clean: Tensor, deltas: Mapping[str, Tensor], ids: Tensor, *,
                  seed: int, steps_grid: Sequence[int], batch_size: int | None = None) -> SurvivalCurve:
    """ρ of each perturbation family for PureGen-DDPM purification at each T_D of ``steps_grid`` (a fresh
    purification per T_D, sharing ``purifier``'s UNet and schedule; same per-id noise on every chain).

    Arguments as for :func:`ebm_survival`, with ``steps_grid`` the T_D values.
    """
    steps = sorted({int(t) for t in steps_grid})
    runs = [DDPMPurifier(purifier.unet, purifier.schedule, steps=t) for t in steps]

    def purify_batch(chains: Tensor, chain_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.stack([run.purify(chains, chain_ids, seed=seed).clamp(-1.0, 1.0) for run in runs])

    return _survival_curve(purify_batch, clean, deltas, ids, steps, batch_size, "DDPM")


# ------------------------------------------------------------------------------------------ shared


def _survival_curve(purify_batch: Any, clean: Tensor, deltas: Mapping[str, Tensor], ids: Tensor,
                    steps: Sequence[int], batch_size: int | None, label: str) -> SurvivalCurve:
    """Batch loop shared by the EBM and DDPM: ``purify_batch(chains, ids) -> (R, chains, C, H, W)`` states."""
    if clean.shape[0] == 0 or not deltas:
        raise ValueError("survival needs images and at least one perturbation")
    for name, delta in deltas.items():
        if delta.shape != clean.shape:
            raise ValueError(f"perturbation {name!r} has shape {tuple(delta.shape)}, images {tuple(clean.shape)}")
    n, names = clean.shape[0], list(deltas)
    batch_size = batch_size or n
    rho: dict[str, list[np.ndarray]] = {name: [] for name in names}
    change: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        x = clean[sl]
        starts = [x] + [perturb(x, deltas[name][sl].to(x.device)) for name in names]
        states = purify_batch(torch.cat(starts), ids[sl].repeat(len(starts))).cpu()
        b = x.shape[0]
        base = states[:, :b]
        for k, name in enumerate(names, start=1):
            effective = starts[k].cpu() - x.cpu()
            rho[name].append(np.stack([survival(base[r], states[r, k * b:(k + 1) * b], effective)
                                       for r in range(len(steps))]))
        change.append(np.stack([relative_change(x.cpu(), base[r]) for r in range(len(steps))]))
        log.info("%s trigger survival: %d/%d images", label, min(start + batch_size, n), n)
    return SurvivalCurve(np.asarray(steps, dtype=np.int64),
                         {name: np.concatenate(parts, axis=1) for name, parts in rho.items()},
                         np.concatenate(change, axis=1))
