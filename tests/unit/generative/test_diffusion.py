"""DDPM schedule, forward noising and the ancestral reverse step, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative.diffusion import DDPMSchedule, diffusion_purify, q_sample, reverse_step
from puregen_dist.generative.noise import STREAM_DIFFUSION, SampleNoise

SCHEDULE = DDPMSchedule.linear()
BETAS64 = np.linspace(1e-4, 0.02, 1000)  # the reference's linear schedule, computed here independently
ALPHA_BAR64 = np.cumprod(1.0 - BETAS64)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads cost more than they give, and on a busy 2-core machine they
    spin against each other (20× slower). conftest restores the thread count afterwards."""
    torch.set_num_threads(1)


def linear_eps(x: Tensor, t: Tensor) -> Tensor:
    """A deterministic stand-in for the UNet: ε̂ = 0.3·x + 0.01·t."""
    return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


def test_schedule_matches_the_reference_values():
    ab = SCHEDULE.alphas_cumprod
    assert SCHEDULE.betas.dtype == torch.float32 and ab.shape == (1000,)
    assert SCHEDULE.betas[0].item() == pytest.approx(1e-4)
    assert SCHEDULE.betas[-1].item() == pytest.approx(0.02)
    # PUREGEN_REFERENCE §2.2.2, 0-based timestep indices, 3 decimals
    for t, expected in {15: 0.996, 50: 0.970, 75: 0.938, 125: 0.844, 250: 0.521}.items():
        assert round(ab[t].item(), 3) == expected
    for t, expected in {15: 0.063, 75: 0.250, 125: 0.395, 250: 0.692}.items():
        assert round(SCHEDULE.sqrt_one_minus_alphas_cumprod[t].item(), 3) == expected
    assert torch.allclose(SCHEDULE.alphas, 1 - SCHEDULE.betas)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod64, ALPHA_BAR64, rtol=1e-12)


def test_schedule_from_config_and_to_device():
    schedule = DDPMSchedule.from_config(DDPMConfig(num_train_timesteps=10, beta_start=0.1, beta_end=0.2))
    assert schedule.num_train_timesteps == 10 and schedule.betas[-1].item() == pytest.approx(0.2)
    moved = schedule.to("cpu")
    assert moved.betas.device.type == "cpu" and moved.num_train_timesteps == 10
    with pytest.raises(ValueError):
        DDPMSchedule.linear(1000, 0.02, 1e-4)


def test_q_sample_golden_numbers():
    x0 = torch.tensor([1.0, -0.5, 0.25, 0.0]).view(4, 1, 1, 1)
    noise = torch.tensor([0.0, 1.0, -2.0, 0.5]).view(4, 1, 1, 1)
    t = torch.tensor([0, 75, 250, 999])
    got = q_sample(x0, t, noise, SCHEDULE).flatten()
    ab = ALPHA_BAR64[[0, 75, 250, 999]]
    expected = np.sqrt(ab) * x0.flatten().numpy() + np.sqrt(1 - ab) * noise.flatten().numpy()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    # recorded from the float64 formulas: √ᾱ_0 = √0.9999, −0.5·√ᾱ_75 + √(1−ᾱ_75) = −0.2344029
    assert got[0].item() == pytest.approx(0.99995, abs=1e-6)
    assert got[1].item() == pytest.approx(-0.2344029, abs=1e-6)


@pytest.mark.parametrize("t", [1, 100])
def test_one_reverse_step_golden(t: int):
    """x_{t−1} computed by hand from Ho et al. eq. 7 and 15 (float64), with x̂₀ clipping."""
    x_t = torch.tensor([-1.8, -0.6, 0.0, 0.35, 0.9, 1.5]).view(1, 1, 2, 3)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    x_prev, x0_hat = reverse_step(linear_eps, x_t, t, SCHEDULE, z)

    x, zz = x_t.double().numpy(), z.double().numpy()
    a_t, a_prev, beta = ALPHA_BAR64[t], ALPHA_BAR64[t - 1], BETAS64[t]
    eps = 0.3 * x + 0.01 * t
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    sigma = np.sqrt(beta * (1 - a_prev) / (1 - a_t))
    np.testing.assert_allclose(x0_hat.numpy(), x0, atol=1e-6)
    np.testing.assert_allclose(x_prev.numpy(), mean + sigma * zz, atol=1e-6)
    assert x0_hat.min().item() == -1.0 and x0_hat.max().item() == 1.0  # both ends clipped in this example


def test_reverse_step_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()  # 1000 steps, linear β, fixed_small, clip_sample
    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    # not at 1 <= t <~ 20: diffusers forms 1 − ᾱ_t in float32 there and is off by up to 3e-4 (we use float64,
    # checked against the hand computation in test_one_reverse_step_golden)
    for t in (0, 74, 500, 999):
        eps = linear_eps(x_t, torch.full((2,), t))
        expected = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        got, _ = reverse_step(linear_eps, x_t, t, SCHEDULE, z)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_x0_hat_is_clipped():
    x_t = torch.linspace(-3, 3, 32).view(2, 1, 4, 4)
    _, x0_hat = reverse_step(lambda x, t: -10 * torch.ones_like(x), x_t, 500, SCHEDULE, torch.zeros_like(x_t))
    assert x0_hat.abs().max().item() == 1.0


def test_no_noise_at_t0():
    x_t = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    huge = torch.full_like(x_t, 1e6)
    x_prev, x0_hat = reverse_step(linear_eps, x_t, 0, SCHEDULE, huge)
    assert torch.equal(x_prev, x0_hat)
    x_none, _ = reverse_step(linear_eps, x_t, 0, SCHEDULE, None)
    assert torch.equal(x_none, x_prev)
    with pytest.raises(ValueError, match="needs noise"):
        reverse_step(linear_eps, x_t, 1, SCHEDULE, None)


def test_steps_zero_is_identity_and_range_is_checked():
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    ids = torch.arange(3)
    assert torch.equal(diffusion_purify(linear_eps, x, ids, steps=0, schedule=SCHEDULE, seed=0), x)
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="diffusion steps"):
            diffusion_purify(linear_eps, x, ids, steps=bad, schedule=SCHEDULE, seed=0)


def test_purify_noises_at_index_td_then_reverses_td_minus_1_to_0():
    """The documented off-by-one: forward to index T_D with the stream's first draw, reverse labels T_D−1…0,
    each z drawn next from the same per-sample stream."""
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    ids = torch.tensor([5, 9])
    seen: list[int] = []

    def recording_eps(x_t: Tensor, t: Tensor) -> Tensor:
        seen.append(int(t[0]))
        return linear_eps(x_t, t)

    got = diffusion_purify(recording_eps, x, ids, steps=3, schedule=SCHEDULE, seed=4)
    assert seen == [2, 1, 0]
    noise = SampleNoise(ids, 4, STREAM_DIFFUSION)
    y = q_sample(x, torch.full((2,), 3), noise.randn((1, 4, 4)), SCHEDULE)
    for t in (2, 1, 0):
        y, _ = reverse_step(linear_eps, y, t, SCHEDULE, noise.randn((1, 4, 4)) if t else None)
    assert torch.equal(got, y)
    assert got.abs().max().item() <= 1.0
