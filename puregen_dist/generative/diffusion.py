"""DDPM forward noising, one ancestral reverse step, and PureGen-DDPM purification (pure functions, no I/O).

Papers: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (2020), https://arxiv.org/abs/2006.11239;
Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627 (PUREGEN_REFERENCE §2.2-§2.3).

Notation: β_t linear in t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s, timesteps indexed 0 … N−1 (N = 1000), images in
[-1, 1]. Purification with T_D steps noises to index T_D and then runs T_D reverse steps t = T_D−1, …, 0:
the off-by-one of the reference implementation (PUREGEN_REFERENCE §2.3.2), kept on purpose so that T_D means
what it meant in the paper's experiments. Every random draw comes from per-sample streams seeded by
(seed, sample id), so the result does not depend on how images are grouped into batches.

:func:`reverse_step` is the readable step; :func:`diffusion_purify` runs the same steps through
:func:`reverse_chain` (coefficients computed once, in-place updates, inference mode, fixed-size micro-batches;
issue 15, benchmarks/ddpm.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative.micro_batches import fixed_kernels, pad_rows
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


# ------------------------------------------------------------------------------------ fast purification loop

MICRO_BATCH: dict[str, int] = {"cpu": 64, "cuda": 256}
"""Rows per UNet call, by device type (others: ``DEFAULT_MICRO_BATCH``). Every call has exactly this many
rows (the last micro-batch is padded with copies of a real row), and each micro-batch runs through all its
steps before the next: a row's numbers never depend on the batch it came in (kernels pick blockings, hence
roundings, per batch size). On the 2-core CPU, 64 rows beat 16 and 32 (benchmarks/ddpm.py --ablations);
smaller batches pay for their padding."""

DEFAULT_MICRO_BATCH = 64
"""Rows per UNet call on device types without a ``MICRO_BATCH`` entry."""

CHANNELS_LAST: dict[str, bool] = {"cpu": True}
"""Feed the UNet channels-last inputs, by device type: oneDNN convolutions are faster in NHWC on CPU
(benchmarks/ddpm.py --ablations). Not measured on CUDA, where the default format is kept."""


@dataclass(frozen=True)
class StepCoefficients:
    """The Python-float coefficients of the reverse step at timestep ``t`` (float64 formulas of
    :func:`reverse_step`): x̂₀ = clip((x_t − eps_scale·ε̂) / sqrt_alpha_bar) (Ho et al. eq. 15) and
    x_{t−1} = coef_x0·x̂₀ + coef_xt·x_t + sigma·z (eq. 7); at t = 0 x_{t−1} = x̂₀."""

    t: int
    eps_scale: float
    sqrt_alpha_bar: float
    coef_x0: float
    coef_xt: float
    sigma: float


def step_coefficients(t: int, schedule: DDPMSchedule) -> StepCoefficients:
    """The coefficients of step ``t`` in [0, N), computed as :func:`reverse_step` computes them."""
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t - 1)
    beta_t = 1.0 - a_t / a_prev
    return StepCoefficients(
        t=t,
        eps_scale=math.sqrt(1.0 - a_t),
        sqrt_alpha_bar=math.sqrt(a_t),
        coef_x0=math.sqrt(a_prev) * beta_t / (1.0 - a_t),
        coef_xt=math.sqrt(1.0 - beta_t) * (1.0 - a_prev) / (1.0 - a_t),
        sigma=math.sqrt(beta_t * (1.0 - a_prev) / (1.0 - a_t)),
    )


def micro_batch_rows(device: torch.device) -> int:
    """Rows per UNet call on ``device`` (``MICRO_BATCH``); a function of the device type only."""
    return MICRO_BATCH.get(device.type, DEFAULT_MICRO_BATCH)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels_last where ``CHANNELS_LAST`` asks for it on ``device``, else contiguous."""
    return torch.channels_last if CHANNELS_LAST.get(device.type, False) else torch.contiguous_format


def reverse_chain(eps_model: EpsModel, x_t: Tensor, noise: SampleNoise,
                  coefficients: Sequence[StepCoefficients], timesteps: Tensor) -> Tensor:
    """Ancestral steps ``coefficients`` (t decreasing to 0) from ``x_t``: the numbers of :func:`reverse_step`
    per step, bit for bit for the same ε̂, with the update done in place on ``x_t`` (which is consumed).

    Args:
        eps_model: ε̂ = eps_model(x_t, t_batch).
        x_t: (R, C, H, W) state at timestep coefficients[0].t + 1, any dtype, any memory format.
        noise: R per-sample streams; one ``randn`` call per step with t > 0, in step order.
        coefficients: one per step, the last one at t = 0.
        timesteps: (len(coefficients), R) int64, row k filled with coefficients[k].t (an expanded, stride-0
            row is fine), on ``x_t``'s device.

    Returns:
        (R, C, H, W) the state after the last step: x̂₀ in [-1, 1] when that step is t = 0.
    """
    shape = tuple(x_t.shape[1:])
    for c, t_batch in zip(coefficients, timesteps, strict=True):
        eps = eps_model(x_t, t_batch)
        x0_hat = (x_t - c.eps_scale * eps).div_(c.sqrt_alpha_bar).clamp_(-1.0, 1.0)
        if c.t == 0:
            return x0_hat
        z = noise.randn(shape, device=x_t.device, dtype=x_t.dtype)
        # μ̃ + σz with the products rounded as in reverse_step: the same bits, without temporaries
        x_t = x_t.mul_(c.coef_xt).add_(x0_hat.mul_(c.coef_x0)).add_(z.mul_(c.sigma))
    return x_t


def diffusion_purify(eps_model: EpsModel, x_sym: Tensor, ids: Tensor, *, steps: int, schedule: DDPMSchedule,
                     seed: int) -> Tensor:
    """PureGen-DDPM Ψ_{T_D}: noise to t = T_D, then T_D ancestral reverse steps t = T_D−1, …, 0 (§2.3).

    Noise comes from :class:`SampleNoise` (stream ``STREAM_DIFFUSION``): the first draw of each sample's
    stream is the forward ε, the following draws the reverse-step z's (none at t = 0). The numbers are those
    of :func:`q_sample` then :func:`reverse_step` per step (bit for bit for the same ε̂), computed faster
    (benchmarks/ddpm.py): inference mode, coefficients computed once, in-place updates, channels-last inputs
    on CPU (``CHANNELS_LAST``), and fixed-size micro-batches (``MICRO_BATCH``) each run through all steps, so
    each output depends only on (image, id, seed), never on the batch it travels in, bit for bit (on CUDA with
    deterministic cuDNN kernels, set for the call).

    Args:
        eps_model: ε̂ = eps_model(x_t, t_batch), on the device of ``schedule``; it receives channels-last
            inputs where ``CHANNELS_LAST`` says so, and t_batch as one timestep expanded to the rows.
        x_sym: (B, C, H, W) float in [-1, 1].
        ids: (B,) int64 sample ids.
        steps: T_D in [0, N − 1]; 0 returns a copy of ``x_sym``.
        schedule: the model's schedule (on the model's device).
        seed: experiment seed.

    Returns:
        (B, C, H, W) float32 in [-1, 1] on ``schedule.device`` (an ordinary tensor, not an inference tensor).
    """
    check_steps(steps, schedule)
    if steps == 0:
        return x_sym.to(schedule.device, torch.float32, copy=True)
    x = x_sym.to(schedule.device, torch.float32)
    ids = torch.as_tensor(ids)
    rows = micro_batch_rows(x.device)
    coefficients = [step_coefficients(t, schedule) for t in range(steps - 1, -1, -1)]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # outside inference mode: a normal tensor
    with torch.inference_mode(), fixed_kernels(x.device):
        # (T_D, rows), row k = T_D−1−k expanded (stride 0): the UNet may embed each timestep once per call
        timesteps = torch.arange(steps - 1, -1, -1, device=x.device).unsqueeze(1).expand(-1, rows)
        for start in range(0, x.shape[0], rows):
            part = slice(start, start + rows)
            out[part] = _purify_rows(eps_model, x[part], ids[part], rows, schedule, seed, coefficients,
                                     timesteps)
    return out


def _purify_rows(eps_model: EpsModel, x: Tensor, ids: Tensor, rows: int, schedule: DDPMSchedule, seed: int,
                 coefficients: Sequence[StepCoefficients], timesteps: Tensor) -> Tensor:
    """Ψ_{T_D} of one micro-batch: (b, C, H, W) with b <= rows, run padded to ``rows`` -> (b, C, H, W)."""
    real = x.shape[0]
    noise = SampleNoise(pad_rows(ids, rows), seed, STREAM_DIFFUSION)  # padding rows replay a real stream
    x = pad_rows(x, rows)
    t_noise = timesteps[0] + 1  # T_D, the forward noising index
    x_t = q_sample(x, t_noise, noise.randn(tuple(x.shape[1:]), device=x.device, dtype=x.dtype), schedule)
    x_t = x_t.contiguous(memory_format=memory_format_for(x.device))
    return reverse_chain(eps_model, x_t, noise, coefficients, timesteps)[:real]
