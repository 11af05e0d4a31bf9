"""DDPM training with "limited forward steps" (PUREGEN_REFERENCE §2.2).

Papers: Ho et al., "Denoising Diffusion Probabilistic Models" (2020), https://arxiv.org/abs/2006.11239;
Bhat et al., "PureGen" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

Per iteration, with a batch x₀ of training images in [-1, 1]:
  1. t ~ Uniform{0, …, max_train_t − 1} (250 in the paper, while the full 1000-step β schedule is kept);
  2. ε ~ N(0, I), x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε;
  3. loss = ‖ε_θ(x_t, t) − ε‖² averaged over pixels (Ho et al. eq. 14, L_simple), AdamW step;
  4. learning rate: linear warm-up then cosine decay to 0, stepped per iteration.
Everything random (init, shuffling, t, ε) is seeded by ``job.seed``; checkpoints hold the weights, the AdamW
state and the generator state, so an interrupted run resumes exactly from its last saved epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.errors import ConfigError
from puregen_dist.config.generative import DDPMJob
from puregen_dist.data.transforms import image_grid, sym_to_uint8, to_sym
from puregen_dist.device import resolve_device
from puregen_dist.generative.checkpoints import (
    CheckpointError,
    check_checkpoint_output,
    load_state,
    optimizer_tensors,
    read_checkpoint_config,
    restore_optimizer,
    save_checkpoint,
)
from puregen_dist.generative.ddpm import KIND, is_puregen_checkpoint
from puregen_dist.generative.diffusion import DDPMSchedule, check_steps, diffusion_purify, q_sample
from puregen_dist.generative.unet import build_unet, eps_model
from puregen_dist.protocols import Tracker
from puregen_dist.types import ImageSet

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, Mapping[str, float]], None]
"""Called after each finished (and, when due, saved) epoch with (epoch from 1, that epoch's metrics)."""


def ddpm_loss(unet: UNet2DModel, x0: Tensor, t: Tensor, noise: Tensor, schedule: DDPMSchedule) -> Tensor:
    """L_simple = mean ‖ε_θ(x_t, t) − ε‖² with x_t = q_sample(x₀, t, ε) (Ho et al. eq. 14).

    Args:
        x0: (B, C, H, W) in [-1, 1]; t: (B,) int64; noise: (B, C, H, W) ε.

    Returns:
        scalar loss tensor (differentiable).
    """
    return torch.nn.functional.mse_loss(unet(q_sample(x0, t, noise, schedule), t).sample, noise)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of optimizer step s (0-based): (s+1)/warmup during warm-up, then 0.5·(1 + cos(π·p)) with
    p = (s − warmup)/(total − warmup). Unlike diffusers' version the first step does not run at lr 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return factor


class DDPMTrainer:
    """State of one DDPM training run: UNet, AdamW, LR schedule, generator, epoch and step counters."""

    def __init__(self, job: DDPMJob, train: ImageSet) -> None:
        self.job, self.cfg = job, job.train
        self.train = train
        self.device = resolve_device(self.cfg.device)
        self.schedule = DDPMSchedule.from_config(job.ddpm).to(self.device)
        self.generator = torch.Generator().manual_seed(job.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            self.unet = build_unet(job.ddpm)
        self.unet.to(self.device)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay)
        self.batches = len(train) // self.cfg.batch_size or 1
        self.lr_factor = warmup_cosine(self.cfg.warmup_steps, self.batches * self.cfg.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.epoch = 0
        self.global_step = 0

    # --- one iteration ------------------------------------------------------------------------------------

    def step(self, x0: Tensor) -> float:
        """One AdamW step on a batch (B, C, H, W) in [-1, 1]; returns the batch loss."""
        t = torch.randint(0, self.cfg.max_train_t, (len(x0),), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        self.unet.train()
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        loss = ddpm_loss(self.unet, x0, t, noise, self.schedule)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"DDPM training loss is {value} at epoch {self.epoch + 1}, "
                                     f"step {self.global_step + 1} (lr {self.cfg.lr} may be too high)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return value

    # --- epochs -------------------------------------------------------------------------------------------

    def run_epoch(self) -> dict[str, float]:
        """One pass over a seeded permutation (last partial batch dropped unless it is the only one)."""
        tick = time.perf_counter()
        order = torch.randperm(len(self.train), generator=self.generator).numpy()
        size = min(self.cfg.batch_size, len(order))
        total, lr = 0.0, self.lr
        for b in range(self.batches):
            lr = self.lr  # the epoch reports the lr of its last step
            total += self.step(to_sym(self.train.images[order[b * size:(b + 1) * size]]))
        self.epoch += 1
        return {"ddpm_loss": total / self.batches, "lr": lr, "epoch_seconds": time.perf_counter() - tick}

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return float(self.optimizer.param_groups[0]["lr"])

    def samples(self, test: ImageSet, count: int) -> tuple[np.ndarray, float]:
        """(2·count, H, W, C) uint8: ``count`` test images, then the same images purified with the job's T_D;
        and the mean squared change in [-1, 1] space."""
        x = to_sym(test.images[:count])
        ids = torch.from_numpy(test.ids[:count])
        self.unet.eval()
        y = diffusion_purify(eps_model(self.unet), x, ids, steps=self.job.diffusion.steps,
                             schedule=self.schedule, seed=self.job.seed).cpu()
        return np.concatenate([test.images[:count], sym_to_uint8(y)]), float((y - x).pow(2).mean())

    # --- checkpoints --------------------------------------------------------------------------------------

    def save(self, directory: Path, stats: Mapping[str, float]) -> None:
        extra = {"generator": self.generator.get_state(), **optimizer_tensors(self.optimizer)}
        meta = {"epoch": self.epoch, "step": self.global_step, "loss": stats["ddpm_loss"],
                "seed": self.job.seed, "train": asdict(self.cfg)}
        save_checkpoint(directory, self.unet, kind=KIND, model_config=asdict(self.job.ddpm), meta=meta,
                        extra_tensors=extra)

    def resume(self, directory: Path) -> None:
        """Continue from a checkpoint written by :meth:`save` (weights, AdamW state, generator, counters)."""
        config = read_checkpoint_config(directory)
        if config["kind"] == KIND and config["model"] != asdict(self.job.ddpm):
            raise CheckpointError(f"{directory}: holds a DDPM with config {config['model']}, the job asks "
                                  f"for {asdict(self.job.ddpm)}; use another output directory")
        meta, extra = load_state(directory, self.unet, kind=KIND)
        _warn_on_changes(directory, meta, self.job)
        if "generator" not in extra:
            raise CheckpointError(f"{directory}: no training state (generator) stored; cannot resume from it")
        restore_optimizer(self.optimizer, extra)
        self.generator.set_state(extra["generator"])
        self.epoch, self.global_step = int(meta["epoch"]), int(meta["step"])
        self.scheduler.last_epoch = self.global_step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_factor(self.global_step)


def train_ddpm(job: DDPMJob, train: ImageSet, test: ImageSet | None, tracker: Tracker, *,
               progress: ProgressCallback | None = None) -> Path:
    """Train (or resume training) the DDPM of ``job`` on ``train``; returns the checkpoint directory.

    Args:
        job: model, training recipe, purification T_D of the sample grid, seed and output directory.
        train: training images (N, H, W, C) uint8 matching ``job.ddpm`` (image_size, in_channels).
        test: source of the grid logged every ``job.train.sample_every`` epochs and at the last (first
            ``job.train.sample_grid`` images, before and after purification with ``job.diffusion.steps``); None
            disables the grid.
        tracker: receives per-epoch ``ddpm_loss``, ``lr``, ``epoch_seconds`` (+ ``ddpm_sample_mse``) and
            grids.
        progress: optional per-epoch callback.

    Raises:
        ConfigError: images do not match the model config.
        CheckpointError: ``job.output`` holds another model or something that is not a checkpoint.
        FloatingPointError: a non-finite loss (names epoch and step).
    """
    _check_data(job, train, test)
    output = Path(job.output)
    if output.is_dir() and any(output.iterdir()) and not is_puregen_checkpoint(output):
        raise CheckpointError(f"{output}: exists and is not a puregen-dist checkpoint; "
                              f"refusing to overwrite it")
    check_checkpoint_output(output, KIND)  # nor a file, a path below one, or another kind's checkpoint
    trainer = DDPMTrainer(job, train)
    if is_puregen_checkpoint(output):
        trainer.resume(output)
        log.info("resuming DDPM training from %s at epoch %d (step %d)", output, trainer.epoch,
                 trainer.global_step)
    if trainer.epoch >= job.train.epochs:
        log.info("%s already holds epoch %d of %d: nothing to train", output, trainer.epoch, job.train.epochs)
        return output
    while trainer.epoch < job.train.epochs:
        stats = trainer.run_epoch()
        epoch = trainer.epoch
        tracker.log_metrics(stats, step=epoch)
        grid_due = epoch % job.train.sample_every == 0 or epoch == job.train.epochs
        if grid_due and test is not None and min(job.train.sample_grid, len(test)) > 0:
            _log_samples(trainer, test, min(job.train.sample_grid, len(test)), tracker)
        if epoch % job.train.checkpoint_every == 0 or epoch == job.train.epochs:
            trainer.save(output, stats)
        log.info("DDPM epoch %d/%d loss=%.5g lr=%.3g seconds=%.1f", epoch, job.train.epochs,
                 stats["ddpm_loss"], stats["lr"], stats["epoch_seconds"])
        if progress is not None:
            progress(epoch, stats)
    return output


def _log_samples(trainer: DDPMTrainer, test: ImageSet, count: int, tracker: Tracker) -> None:
    """Grid of ``count`` test images (top row) and their purified versions (bottom row), plus the mean
    squared change."""
    images, mse = trainer.samples(test, count)
    tracker.log_metrics({"ddpm_sample_mse": mse}, step=trainer.epoch)
    tracker.log_image(image_grid(images, columns=count), f"ddpm_samples_epoch{trainer.epoch}")


def _check_data(job: DDPMJob, train: ImageSet, test: ImageSet | None) -> None:
    """Fail before any compute when the images do not fit the model or the grid's T_D the schedule."""
    expected = (job.ddpm.image_size, job.ddpm.image_size, job.ddpm.in_channels)
    for name, data in (("train", train), ("test", test)):
        if data is not None and len(data) and data.shape != expected:
            raise ConfigError(f"ddpm: {name} images are {data.shape} (H, W, C), the model expects "
                              f"{expected}; set ddpm.image_size / ddpm.in_channels or data.image_size")
    if len(train) == 0:
        raise ConfigError("ddpm: the training set is empty")
    try:
        check_steps(job.diffusion.steps, DDPMSchedule.from_config(job.ddpm))
    except ValueError as exc:
        raise ConfigError(f"diffusion.steps: {exc}") from None


def _warn_on_changes(directory: Path, meta: Mapping[str, Any], job: DDPMJob) -> None:
    """Resuming with another seed or recipe is allowed but is no longer the same run: say so."""
    stored = dict(meta.get("train", {}))
    current = asdict(job.train)
    changed = sorted(k for k in current if k != "epochs" and k in stored and stored[k] != current[k])
    if meta.get("seed") != job.seed:
        changed.append("seed")
    if changed:
        log.warning("resuming %s with changed settings %s: the run will differ from an uninterrupted one",
                    directory, changed)
