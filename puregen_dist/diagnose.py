"""``puregen-dist diagnose``: the paper's Figure 1 (EBM energies of clean, poisoned and purified images) and
Figure 3 (ℓ2 distances ‖x − Ψ_t(x+δ)‖, ‖(x+δ) − Ψ_t(x+δ)‖, ‖x − Ψ_t(x)‖ over purification steps) for a trained
EBM and/or DDPM, as PNG plots with the numbers as CSV tables, logged to the tracker."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
from puregen_dist.plots import energy_histogram_png, trajectories_png, write_csv
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


def prepare_diagnose(job: DiagnoseJob) -> PreparedDiagnose:
    """Load data and models, craft the poison; errors (bad checkpoint, no poisoned rows) before any output."""
    device = resolve_device(job.device)
    train, _ = load_data(job.data)
    attack = build_attack(job.attack)
    attack.validate(train)
    poison = attack.craft(train, seed=job.seed)
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
    return PreparedDiagnose(job, clean, poisoned, ebm, ddpm)


def run_diagnose(prep: PreparedDiagnose, tracker: Tracker) -> list[Path]:
    """Write and log the figures and tables; returns their paths."""
    job, out = prep.job, Path(prep.job.output_dir)
    tracker.log_params(flatten(job))
    paths: list[Path] = []
    if prep.ebm is not None:
        paths += _energy_figure(prep, out)
        paths += _ebm_trajectories(prep, out)
    if prep.ddpm is not None:
        paths += _ddpm_trajectories(prep, out)
    for path in paths:
        tracker.log_artifact(path, "diagnostics")
    return paths


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
