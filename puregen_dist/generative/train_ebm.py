"""EBM training with data-initialised persistent chains (PUREGEN_REFERENCE §1.2; Nijkamp et al., "On the
Anatomy of MCMC-Based Maximum Likelihood Learning of Energy-Based Models", https://arxiv.org/abs/1903.12370).

Per iteration, with a batch x of training images in [-1, 1]:
  1. positives x⁺ = x + σ_data·N(0, I);
  2. draw B distinct chains from the bank, run K Langevin steps (ε, T) on them → negatives x⁻;
  3. write x⁻ back; each written chain is, with probability p_rejuv, replaced by x + σ_data·N(0, I);
  4. loss L = (mean G(x⁺) − mean G(x⁻)) / T, minimised with Adam; MultiStepLR per epoch.
The bank starts as training images + σ_data noise. Checkpoints (weights, Adam state, bank, RNG) make training
resume from the last saved epoch.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.generative import EBMJob
from puregen_dist.data.transforms import image_grid, sym_to_uint8, to_sym
from puregen_dist.device import resolve_device
from puregen_dist.generative.checkpoints import (
    CONFIG,
    check_checkpoint_output,
    load_state,
    optimizer_tensors,
    read_checkpoint_config,
    restore_optimizer,
    save_checkpoint,
)
from puregen_dist.generative.ebm import build_ebm
from puregen_dist.generative.langevin import LangevinStep, check_finite, langevin_chain
from puregen_dist.protocols import Tracker
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

WALL_CLOCK_STATS = ("epoch_seconds",)
"""Epoch statistics left out of checkpoint metadata: a checkpoint is a function of its recipe and data only."""


class EBMTrainer:
    """State of one EBM training run: model, Adam, schedule, persistent bank and generator."""

    def __init__(self, job: EBMJob, train: ImageSet) -> None:
        self.job, self.cfg = job, job.train
        self.device = resolve_device(self.cfg.device)
        self.data = to_sym(train.images)
        self.generator = torch.Generator().manual_seed(job.seed)
        self.device_generator = None if self.device.type == "cpu" else torch.Generator(device=self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            self.model = build_ebm(job.ebm).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(self.cfg.milestones),
                                                              self.cfg.gamma)
        self.bank = self._noisy(self.data[self._randint(len(self.data), self.cfg.bank_size)])
        self.epoch = 0

    # --- one iteration ------------------------------------------------------------------------------------

    def step(self, x_data: Tensor) -> dict[str, float]:
        """One training iteration on a batch of data (B, C, H, W) in [-1, 1]; returns its statistics."""
        cfg = self.cfg
        x_pos = self._noisy(x_data).to(self.device)
        chains = torch.randperm(len(self.bank), generator=self.generator)[: len(x_data)]
        x_neg, grad_norm = self._sample(self.bank[chains].to(self.device))
        reset = torch.rand(len(chains), generator=self.generator) < cfg.rejuvenation
        self.bank[chains] = torch.where(reset.view(-1, 1, 1, 1), self._noisy(x_data), x_neg.cpu())
        self.model.requires_grad_(True)
        e_pos, e_neg = self.model(x_pos), self.model(x_neg)
        loss = (e_pos.mean() - e_neg.mean()) / cfg.langevin.temperature
        if not torch.isfinite(loss):
            raise FloatingPointError(f"EBM training loss is {loss.item()} at epoch {self.epoch + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"ebm_loss": loss.item(), "energy_pos": e_pos.mean().item(), "energy_neg": e_neg.mean().item(),
                "langevin_grad_norm": grad_norm}

    def _sample(self, x: Tensor) -> tuple[Tensor, float]:
        """K Langevin steps from ``x`` with the parameters frozen; returns the samples and the logged gradient
        norm: mean over steps of (ε²/2)·mean_batch ‖∇ₓ(G/T)‖₂ (§1.2.8)."""
        lang, steps = self.cfg.langevin, self.cfg.mcmc_steps
        self.model.requires_grad_(False)
        self._reseed_device_noise()
        norms = []
        for k, update in enumerate(self._chain(x, steps)):
            x = update.x
            norms.append((0.5 * lang.step_size**2) * update.grad.flatten(1).norm(dim=1).mean())
            if k + 1 == steps:
                check_finite(update.energy, update.grad,
                             where=f"EBM training epoch {self.epoch + 1}, chain step {k + 1}")
        return x.detach(), float(torch.stack(norms).mean())

    def _chain(self, x: Tensor, steps: int) -> Iterator[LangevinStep]:
        """``langevin_chain`` of the model from ``x`` (B, C, H, W), noise from the trainer's generator (drawn
        on CPU, then moved): yields (x_{k+1}, G(x_k), ∇ₓ(G/T)(x_k)) per step."""
        lang = self.cfg.langevin
        return langevin_chain(self.model, x, self._chain_noise, steps=steps, step_size=lang.step_size,
                              temperature=lang.temperature)

    def _chain_noise(self, x: Tensor) -> Tensor:
        if self.device_generator is not None:
            return torch.randn(x.shape, generator=self.device_generator, device=self.device)
        return torch.randn(x.shape, generator=self.generator)

    def _reseed_device_noise(self) -> None:
        """On an accelerator, the chain noise is drawn there (drawing it on the host and copying it made the
        training loop host-bound: K·B·C·H·W normals per iteration), from a device generator reseeded before
        each chain from the trainer's generator, so a run stays determined by its seed and resumes exactly.
        On CPU the noise comes from the trainer's generator itself (nothing to reseed)."""
        if self.device_generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.device_generator.manual_seed(seed)

    # --- epochs -------------------------------------------------------------------------------------------

    def run_epoch(self) -> dict[str, float]:
        """One pass over the data in a seeded order (last partial batch dropped, as in the paper)."""
        tick = time.perf_counter()
        order = torch.randperm(len(self.data), generator=self.generator)
        batches = len(order) // self.cfg.batch_size or 1
        totals: dict[str, float] = {}
        for b in range(batches):
            stats = self.step(self.data[order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]])
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / batches
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.epoch += 1
        return {**totals, "lr": lr, "epoch_seconds": time.perf_counter() - tick}

    def samples(self, count: int, steps: int) -> np.ndarray:
        """(count, H, W, C) uint8 short-run samples: ``steps`` Langevin steps from data + σ_data noise."""
        x = self._noisy(self.data[:count]).to(self.device)
        self.model.requires_grad_(False)
        self._reseed_device_noise()
        for update in self._chain(x, steps):
            x = update.x
        return sym_to_uint8(x)

    # --- checkpoints --------------------------------------------------------------------------------------

    def save(self, directory: Path, stats: dict[str, float]) -> None:
        extra = {"bank": self.bank, "generator": self.generator.get_state(),
                 **optimizer_tensors(self.optimizer)}
        save_checkpoint(directory, self.model, kind="ebm", model_config=asdict(self.job.ebm),
                        meta={"epoch": self.epoch, "seed": self.job.seed, "train": asdict(self.cfg),
                              **{k: v for k, v in stats.items() if k not in WALL_CLOCK_STATS}},
                        extra_tensors=extra)

    def resume(self, directory: Path) -> None:
        """Continue from a checkpoint written by :meth:`save`."""
        meta, extra = load_state(directory, self.model, kind="ebm")
        restore_optimizer(self.optimizer, extra)
        self.bank = extra["bank"].clone()
        self.generator.set_state(extra["generator"])
        self.epoch = int(meta["epoch"])
        with warnings.catch_warnings():  # fast-forwarding the schedule without optimizer steps is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.epoch):
                self.scheduler.step()

    # --- helpers ------------------------------------------------------------------------------------------

    def _noisy(self, x: Tensor) -> Tensor:
        return x + self.cfg.data_noise * torch.randn(x.shape, generator=self.generator)

    def _randint(self, high: int, size: int) -> Tensor:
        if size <= high:
            return torch.randperm(high, generator=self.generator)[:size]
        return torch.randint(0, high, (size,), generator=self.generator)


def train_ebm(job: EBMJob, train: ImageSet, tracker: Tracker) -> Path:
    """Train (or resume training) the EBM of ``job`` on ``train``; returns the checkpoint directory.

    Logs per epoch: ebm_loss, energy_pos, energy_neg, langevin_grad_norm, lr, epoch_seconds, and a grid of
    short-run samples. Resumes from ``job.output`` when it holds an earlier epoch of the same model.
    """
    output = Path(job.output)
    check_checkpoint_output(output, "ebm")  # a file or a directory of other files is never moved aside
    trainer = EBMTrainer(job, train)
    if (output / CONFIG).is_file():
        trainer.resume(output)
        log.info("resuming EBM training from %s at epoch %d/%d", output, trainer.epoch, job.train.epochs)
    while trainer.epoch < job.train.epochs:
        stats = trainer.run_epoch()
        tracker.log_metrics(stats, step=trainer.epoch)
        log.info("EBM epoch %d/%d %s", trainer.epoch, job.train.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if job.train.sample_grid:
            grid = image_grid(trainer.samples(min(job.train.sample_grid, len(train)), job.train.sample_steps))
            tracker.log_image(grid, f"ebm_samples_epoch{trainer.epoch:03d}")
        if trainer.epoch % job.train.checkpoint_every == 0 or trainer.epoch == job.train.epochs:
            trainer.save(output, stats)
    return output


def checkpoint_epoch(directory: str | Path) -> int:
    """The epoch recorded in a checkpoint directory (0 when there is none)."""
    path = Path(directory)
    return int(read_checkpoint_config(path)["meta"].get("epoch", 0)) if (path / CONFIG).is_file() else 0


__all__ = ["EBMTrainer", "checkpoint_epoch", "train_ebm"]
