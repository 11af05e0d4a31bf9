"""DDPM forward noising, one ancestral reverse step, and PureGen-DDPM purification (pure functions, no I/O).

Papers: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (2020), https://arxiv.org/abs/2006.11239;
Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627 (PUREGEN_REFERENCE §2.2-§2.3).

Notation: β_t linear in t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, timesteps indexed 0 … N−1 (N = 1000), images in
[-1, 1]. Purification with T_D steps noises to index T_D and then runs T_D reverse steps t = T_D−1, …, 0:
the off-by-one of the reference implementation (PUREGEN_REFERENCE §2.3.2), kept on purpose so that T_D means
what it meant in the paper's experiments. Every random draw comes from per-sample streams seeded by
(seed, sample id), so the result does not depend on how images are grouped into batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative.noise import STREAM_DIFFUSION, SampleNoise

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""ε̂ = eps_model(x_t, t): (B, C, H, W) float and (B,) int64 timesteps -> (B, C, H, W) predicted noise."""


@dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """Linear-β DDPM schedule (diffusers' ``DDPMScheduler`` defaults: β from 1e-4 to 0.02 over 1000 steps).

    All tables are computed in float64 and stored as float32 tensors of shape (N,) for use on a device;
    ``alphas_cumprod64`` keeps the float64 ᾱ on the CPU for the scalar per-step coefficients of
    :func:`reverse_step` (1 − ᾱ_t in float32 loses four digits at small t).
    """

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    alphas_cumprod64: np.ndarray = dataclasses.field(repr=False)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> DDPMSchedule:
        """β_t = linspace(beta_start, beta_end, N)[t]."""
        if num_train_timesteps < 2 or not 0 < beta_start < beta_end < 1:
            raise ValueError(f"invalid linear schedule: N={num_train_timesteps}, "
                             f"β from {beta_start} to {beta_end}")
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        alphas = 1.0 - betas
        cumprod = np.cumprod(alphas)

        def f32(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a.astype(np.float32))

        return cls(num_train_timesteps, float(beta_start), float(beta_end), f32(betas), f32(alphas),
                   f32(cumprod), f32(np.sqrt(cumprod)), f32(np.sqrt(1.0 - cumprod)), cumprod)

    @classmethod
    def from_config(cls, cfg: DDPMConfig) -> DDPMSchedule:
        """The schedule of a :class:`DDPMConfig` (``num_train_timesteps``, ``beta_start``, ``beta_end``)."""
        return cls.linear(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> DDPMSchedule:
        """A copy whose tensors live on ``device`` (the float64 CPU table stays where it is)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t in float64; ᾱ_{−1} = 1 by convention (the posterior at t = 0 collapses onto x̂₀)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod64[t])


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: DDPMSchedule) -> Tensor:
    """Forward diffusion q(x_t | x_0) (Ho et al. eq. 4): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.

    Args:
        x0: (B, C, H, W) clean images in [-1, 1].
        t: (B,) int64 timesteps in [0, N).
        noise: (B, C, H, W) ε ~ N(0, I).
        schedule: on the same device as ``x0``.

    Returns:
        (B, C, H, W) x_t (unbounded).
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = schedule.sqrt_alphas_cumprod[t].view(shape).to(x0.dtype)
    s = schedule.sqrt_one_minus_alphas_cumprod[t].view(shape).to(x0.dtype)
    return a * x0 + s * noise


def reverse_step(eps_model: EpsModel, x_t: Tensor, t: int, schedule: DDPMSchedule,
                 noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """One ancestral DDPM step x_t -> x_{t−1} with x̂₀ clipping ("fixed_small" variance, ε-prediction).

    Args:
        eps_model: ε̂ = eps_model(x_t, t_batch).
        x_t: (B, C, H, W) current sample.
        t: timestep index in [0, N).
        schedule: the model's schedule.
        noise: (B, C, H, W) z ~ N(0, I) for t > 0; ignored (may be None) at t = 0.

    Returns:
        (x_{t−1}, x̂₀), both (B, C, H, W); x̂₀ is in [-1, 1], and at t = 0 x_{t−1} is x̂₀ itself.
    """
    if not 0 <= t < schedule.num_train_timesteps:
        raise ValueError(f"timestep {t} outside [0, {schedule.num_train_timesteps})")
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - 1)
    beta_t = 1.0 - a_t / a_prev
    # 1. predict the noise, ε̂ = ε_θ(x_t, t)  (ε-parameterisation, Ho et al. eq. 11)
    t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    eps = eps_model(x_t, t_batch)
    # 2. x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  (eq. 15), clipped to the data range [-1, 1]
    x0_hat = ((x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)).clamp(-1.0, 1.0)
    # 3. at t = 0 the posterior is a point mass on x̂₀ (ᾱ_{−1} = 1 gives coefficients 1 and 0, β̃_0 = 0)
    if t == 0:
        return x0_hat, x0_hat
    if noise is None:
        raise ValueError(f"reverse_step at t={t} > 0 needs noise")
    # 4. posterior mean μ̃_t(x_t, x̂₀) = √ᾱ_{t−1} β_t/(1−ᾱ_t) x̂₀ + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) x_t  (eq. 7)
    coef_x0 = math.sqrt(a_prev) * beta_t / (1.0 - a_t)
    coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - a_prev) / (1.0 - a_t)
    mean = coef_x0 * x0_hat + coef_xt * x_t
    # 5. σ_t² = β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t)  (eq. 7); x_{t−1} = μ̃_t + σ_t z
    sigma = math.sqrt(beta_t * (1.0 - a_prev) / (1.0 - a_t))
    return mean + sigma * noise, x0_hat


def check_steps(steps: int, schedule: DDPMSchedule) -> None:
    """Purification noises to index ``steps``, which must exist: 0 <= steps <= N − 1."""
    if not 0 <= steps < schedule.num_train_timesteps:
        raise ValueError(f"diffusion steps must lie in [0, {schedule.num_train_timesteps - 1}] "
                         f"(noising goes to timestep index T_D), got {steps}")


@torch.no_grad()
def diffusion_purify(eps_model: EpsModel, x_sym: Tensor, ids: Tensor, *, steps: int, schedule: DDPMSchedule,
                     seed: int) -> Tensor:
    """PureGen-DDPM Ψ_{T_D}: noise to t = T_D, then T_D ancestral reverse steps t = T_D−1, …, 0 (§2.3).

    Noise comes from :class:`SampleNoise` (stream ``STREAM_DIFFUSION``): the first draw of each sample's
    stream is the forward ε, the following draws the reverse-step z's (none at t = 0), so each output depends
    only on (image, id, seed), never on the batch it travels in: bit for bit on CPU; on CUDA the kernels that
    cuDNN picks per batch size move values by up to ~4e-5 with TF32 convolutions (~5e-7 without), which flips
    a few uint8 pixels by one level.

    Args:
        eps_model: ε̂ = eps_model(x_t, t_batch), on the device of ``schedule``.
        x_sym: (B, C, H, W) float in [-1, 1].
        ids: (B,) int64 sample ids.
        steps: T_D in [0, N − 1]; 0 returns a copy of ``x_sym``.
        schedule: the model's schedule (on the model's device).
        seed: experiment seed.

    Returns:
        (B, C, H, W) float in [-1, 1] on ``schedule.device``.
    """
    check_steps(steps, schedule)
    if steps == 0:
        return x_sym.to(schedule.device, torch.float32, copy=True)
    x = x_sym.to(schedule.device, torch.float32)
    noise = SampleNoise(ids, seed, STREAM_DIFFUSION)
    sample_shape = tuple(x.shape[1:])
    # 1. forward: x_{T_D} = √ᾱ_{T_D} x + √(1−ᾱ_{T_D}) ε, at timestep index T_D exactly
    t_noise = torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device)
    x = q_sample(x, t_noise, noise.randn(sample_shape, x.device), schedule)
    # 2. reverse: T_D ancestral steps labelled T_D−1, …, 0 (the reference's off-by-one)
    for t in range(steps - 1, -1, -1):
        z = noise.randn(sample_shape, x.device) if t > 0 else None
        x, _ = reverse_step(eps_model, x, t, schedule, z)
    return x
