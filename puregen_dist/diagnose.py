"""``puregen-dist diagnose``: the paper's Figure 1 (EBM energies of clean, poisoned and purified images) and
Figure 3 (ℓ2 distances ‖x − Ψ_t(x+δ)‖, ‖(x+δ) − Ψ_t(x+δ)‖, ‖x − Ψ_t(x)‖ over purification steps), and the
trigger survival ρ of perturbation families with the relative change of clean images
(:mod:`puregen_dist.generative.survival`), for a trained EBM and/or DDPM, as PNG plots with the numbers as CSV
tables, logged to the tracker (ρ also as metrics against the step)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puregen_dist.atomic import atomic_write_text
from puregen_dist.attacks import build_attack
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import DiagnoseJob
from puregen_dist.config.loading import flatten
from puregen_dist.data.datasets import load_data
from puregen_dist.data.transforms import to_sym
from puregen_dist.device import resolve_device
from puregen_dist.generative.ddpm import DDPMPurifier, load_ddpm
from puregen_dist.generative.diagnostics import ddpm_l2_trajectories, ebm_l2_trajectories, energy_groups
from puregen_dist.generative.purifiers import EBMPurifier, load_ebm, purify_imageset
from puregen_dist.generative.survival import SurvivalCurve, ddpm_survival, ebm_survival, make_pattern
from puregen_dist.plots import (
    energy_histogram_png,
    survival_markdown,
    survival_png,
    trajectories_png,
    write_csv,
)
from puregen_dist.protocols import Tracker
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)


@dataclass
class PreparedDiagnose:
    """Clean originals and poisoned versions of the same images, plus the loaded purifiers."""

    job: DiagnoseJob
    clean: ImageSet
    poisoned: ImageSet
    ebm: EBMPurifier | None
    ddpm: DDPMPurifier | None
    survival_images: ImageSet | None = None
    """Seeded training images that carry the random survival patterns."""


def prepare_diagnose(job: DiagnoseJob) -> PreparedDiagnose:
    """Load data and models, craft the poison; errors (bad checkpoint, no poisoned rows) before any output."""
    device = resolve_device(job.device)
    train, test = load_data(job.data)
    attack = build_attack(job.attack)
    attack.validate(train)
    poison = attack.craft(train, seed=job.seed, test=test)
    if len(poison.poison_ids) == 0:
        raise UserInputError("attack: diagnose needs an attack that poisons images (attack.name is 'none')")
    ids = poison.poison_ids[: job.num_images]
    clean = train.take(train.positions(ids))
    poisoned = poison.materialize().take(train.positions(ids))
    ebm = EBMPurifier(load_ebm(job.ebm, device)[0], job.langevin) if job.ebm else None
    ddpm = None
    if job.ddpm:
        unet, schedule = load_ddpm(job.ddpm, device)
        ddpm = DDPMPurifier(unet, schedule, job.diffusion.steps)
    return PreparedDiagnose(job, clean, poisoned, ebm, ddpm, _survival_images(job, train))


def _survival_images(job: DiagnoseJob, train: ImageSet) -> ImageSet | None:
    """``survival.num_images`` training images chosen with ``seed`` (None when no random pattern is set)."""
    if not [p for p in job.survival.patterns if p != "attack"]:
        return None
    count = min(job.survival.num_images, len(train))
    return train.take(np.sort(np.random.default_rng(job.seed).choice(len(train), count, replace=False)))


def run_diagnose(prep: PreparedDiagnose, tracker: Tracker) -> list[Path]:
    """Write and log the figures and tables; returns their paths."""
    job, out = prep.job, Path(prep.job.output_dir)
    tracker.log_params(flatten(job))
    paths: list[Path] = []
    survival_rows: list[dict] = []
    if prep.ebm is not None:
        paths += _energy_figure(prep, out)
        paths += _ebm_trajectories(prep, out)
        paths += _survival(prep, out, "ebm", tracker, survival_rows)
    if prep.ddpm is not None:
        paths += _ddpm_trajectories(prep, out)
        paths += _survival(prep, out, "ddpm", tracker, survival_rows)
    if survival_rows:
        paths.append(write_csv(survival_rows, out / "survival.csv"))
        defaults = {"ebm": job.langevin.steps, "ddpm": job.diffusion.steps}
        paths.append(atomic_write_text(out / "survival.md", survival_markdown(survival_rows, defaults)))
    for path in paths:
        tracker.log_artifact(path, "diagnostics")
    return paths


def survival_rows_from_metrics(metrics: Mapping[str, Sequence[tuple[int, float]]]) -> list[dict[str, Any]]:
    """The ``survival.csv`` rows (model, pattern, step, rho_mean, clean_change_mean) rebuilt from the tracker
    metrics :func:`_survival` logged (``<model>_rho_<pattern>`` and ``<model>_clean_change`` against the step),
    e.g. to re-derive a published ρ table from its MLflow run."""
    rows = []
    for name, history in metrics.items():
        model, sep, pattern = name.partition("_rho_")
        if not sep:
            continue
        if f"{model}_clean_change" not in metrics:
            raise ValueError(f"metric {name!r} has no companion {model}_clean_change: the run's survival metrics are "
                             "incomplete (was the diagnose run cut short?)")
        change = dict(metrics[f"{model}_clean_change"])
        rows += [{"model": model, "pattern": pattern, "step": int(step), "rho_mean": value,
                  "clean_change_mean": change[step]} for step, value in history]
    return rows


def _energy_figure(prep: PreparedDiagnose, out: Path) -> list[Path]:
    purified = purify_imageset(prep.ebm, prep.poisoned, seed=prep.job.seed, batch_size=prep.job.batch_size)
    groups = {"clean": prep.clean.images, "poisoned": prep.poisoned.images, "purified": purified.images}
    energies = energy_groups(prep.ebm, groups, prep.job.batch_size)
    rows = [{"group": name, "id": int(i), "energy": float(e)}
            for name, values in energies.items() for i, e in zip(prep.clean.ids, values, strict=True)]
    summary = ", ".join(f"{k} {np.mean(v):.4g}" for k, v in energies.items())
    log.info("mean energies: %s", summary)
    return [energy_histogram_png(energies, out / "energy_histogram.png",
                                 f"EBM energy ({prep.ebm.langevin.steps} Langevin steps)"),
            write_csv(rows, out / "energies.csv")]


def _ebm_trajectories(prep: PreparedDiagnose, out: Path) -> list[Path]:
    clean, poisoned, ids = _tensors(prep)
    traj = ebm_l2_trajectories(prep.ebm, clean, poisoned, ids, seed=prep.job.seed, every=prep.job.every,
                               batch_size=prep.job.batch_size)
    log.info("EBM: ‖x − Ψ(x+δ)‖ falls below ‖(x+δ) − Ψ(x+δ)‖ at step %s", traj.crossing_step())
    return [trajectories_png(traj, out / "ebm_l2_trajectories.png", "PureGen-EBM ℓ2 distances", "Langevin steps"),
            write_csv(traj.as_rows(), out / "ebm_l2_trajectories.csv")]


def _ddpm_trajectories(prep: PreparedDiagnose, out: Path) -> list[Path]:
    clean, poisoned, ids = _tensors(prep)
    grid = [t for t in prep.job.ddpm_grid if t < prep.ddpm.schedule.num_train_timesteps]
    traj = ddpm_l2_trajectories(prep.ddpm, clean, poisoned, ids, seed=prep.job.seed, steps_grid=grid,
                                batch_size=prep.job.batch_size)
    log.info("DDPM: ‖x − Ψ(x+δ)‖ falls below ‖(x+δ) − Ψ(x+δ)‖ at T_D = %s", traj.crossing_step())
    return [trajectories_png(traj, out / "ddpm_l2_trajectories.png", "PureGen-DDPM ℓ2 distances",
                             "diffusion steps T_D"),
            write_csv(traj.as_rows(), out / "ddpm_l2_trajectories.csv")]


def _tensors(prep: PreparedDiagnose) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return to_sym(prep.clean.images), to_sym(prep.poisoned.images), torch.from_numpy(prep.clean.ids)


def _survival(prep: PreparedDiagnose, out: Path, model: str, tracker: Tracker, rows: list[dict]) -> list[Path]:
    """Trigger survival of the configured patterns for ``model`` ("ebm" | "ddpm"): the plot, ρ per step as
    tracker metrics (``<model>_rho_<pattern>``, ``<model>_clean_change``), the rows for ``survival.csv``."""
    job = prep.job
    if not job.survival.patterns:
        return []
    curve = _survival_curve(prep, model)
    for i, step in enumerate(curve.steps):
        metrics = {f"{model}_rho_{name}": float(np.nanmean(values[i])) for name, values in curve.rho.items()}
        metrics[f"{model}_clean_change"] = float(curve.clean_change[i].mean())
        tracker.log_metrics(metrics, step=int(step))
    default = job.langevin.steps if model == "ebm" else job.diffusion.steps
    if default in curve.steps:
        summary = ", ".join(f"{k} {v:.3f}" for k, v in curve.at(default).items())
        log.info("%s trigger survival at t = %d: %s", model.upper(), default, summary)
    rows += curve.as_rows(model)
    label = "EBM Langevin steps" if model == "ebm" else "DDPM steps $T_D$"
    return [survival_png(curve, out / f"survival_{model}.png", f"PureGen-{model.upper()} trigger survival "
                         f"(eps = {job.survival.eps * 255:.0f}/255)", label,
                         default if default in curve.steps else None)]


def _survival_curve(prep: PreparedDiagnose, model: str) -> SurvivalCurve:
    """ρ of the random patterns (on the survival images) and of the attack's perturbations (on its poisoned
    rows), at the same steps, merged into one curve (clean change from the first measured set)."""
    job, cfg = prep.job, prep.job.survival
    sets: list[tuple[ImageSet, dict[str, torch.Tensor]]] = []
    if prep.survival_images is not None:
        data = prep.survival_images
        shape = (data.shape[2], data.shape[0], data.shape[1])
        sets.append((data, {name: make_pattern(name, data.ids.tolist(), shape, cfg.eps, seed=job.seed)
                            for name in cfg.patterns if name != "attack"}))
    if "attack" in cfg.patterns:
        delta = (to_sym(prep.poisoned.images) - to_sym(prep.clean.images)) / 2.0
        sets.append((prep.clean, {"attack": delta}))
    curves = [_measure(prep, model, data, deltas) for data, deltas in sets]
    return SurvivalCurve(curves[0].steps, {k: v for c in curves for k, v in c.rho.items()},
                         curves[0].clean_change)


def _measure(prep: PreparedDiagnose, model: str, data: ImageSet, deltas: dict[str, torch.Tensor]
             ) -> SurvivalCurve:
    job = prep.job
    x, ids = to_sym(data.images), torch.from_numpy(data.ids)
    if model == "ebm":
        steps = sorted({*range(0, job.survival.langevin_steps + 1, job.every), job.survival.langevin_steps,
                        job.langevin.steps})
        return ebm_survival(prep.ebm, x, deltas, ids, seed=job.seed, record_at=steps,
                            batch_size=job.batch_size)
    grid = sorted({t for t in (*job.ddpm_grid, job.diffusion.steps)
                   if t < prep.ddpm.schedule.num_train_timesteps})
    return ddpm_survival(prep.ddpm, x, deltas, ids, seed=job.seed, steps_grid=grid, batch_size=job.batch_size)
