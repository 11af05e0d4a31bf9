"""The fast DDPM purification loop (issue 15) against the literal one: ``q_sample`` then ``reverse_step`` per
step, with the same per-sample noise."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from puregen_dist.config.generative import DDPMConfig
from puregen_dist.generative import diffusion
from puregen_dist.generative.diffusion import (
    DDPMSchedule,
    diffusion_purify,
    q_sample,
    reverse_chain,
    reverse_step,
    step_coefficients,
)
from puregen_dist.generative.noise import STREAM_DIFFUSION, SampleNoise
from puregen_dist.generative.unet import LeanUNet, build_unet, eps_model, lean_supported

SCHEDULE = DDPMSchedule.linear()
CFG = DDPMConfig(size="S", in_channels=3, image_size=16, layers_per_block=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they give on a busy 2-core machine (conftest restores)."""
    torch.set_num_threads(1)


def linear_eps(x: Tensor, t: Tensor) -> Tensor:
    """A deterministic, elementwise stand-in for the UNet: ε̂ = 0.3·x + 0.01·t."""
    return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).to(x.dtype)


def tiny_unet(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_unet(CFG).to(device, dtype).eval().requires_grad_(False)


def images(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    x = torch.rand(n, CFG.in_channels, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(3))
    return (x * 2 - 1).to(device, dtype)


def literal_purify(model, x: Tensor, ids: Tensor, steps: int, seed: int, schedule: DDPMSchedule = SCHEDULE,
                   ) -> Tensor:
    """The readable loop: whole batch, default memory format, ``reverse_step`` per step."""
    noise = SampleNoise(ids, seed, STREAM_DIFFUSION)
    shape = tuple(x.shape[1:])
    with torch.no_grad():
        t_noise = torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device)
        x = q_sample(x, t_noise, noise.randn(shape, device=x.device, dtype=x.dtype), schedule)
        for t in range(steps - 1, -1, -1):
            z = noise.randn(shape, device=x.device, dtype=x.dtype) if t > 0 else None
            x, _ = reverse_step(model, x, t, schedule, z)
    return x


def fast_chain(model, x: Tensor, ids: Tensor, steps: int, seed: int, schedule: DDPMSchedule = SCHEDULE,
               memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """``reverse_chain`` from the same forward noising as ``literal_purify`` (any dtype, one micro-batch)."""
    noise = SampleNoise(ids, seed, STREAM_DIFFUSION)
    t_noise = torch.full((x.shape[0],), steps, dtype=torch.long, device=x.device)
    x_t = q_sample(x, t_noise, noise.randn(tuple(x.shape[1:]), device=x.device, dtype=x.dtype), schedule)
    coefficients = [step_coefficients(t, schedule) for t in range(steps - 1, -1, -1)]
    timesteps = torch.arange(steps - 1, -1, -1, device=x.device).unsqueeze(1).repeat(1, x.shape[0])
    with torch.inference_mode():
        return reverse_chain(model, x_t.contiguous(memory_format=memory_format), noise, coefficients,
                             timesteps).clone(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_chain_gives_the_literal_bits_for_the_same_eps(dtype: torch.dtype):
    """Same ε̂ in, same numbers out: coefficients and the in-place update round exactly as reverse_step."""
    x, ids = images(5, dtype), torch.arange(10, 15)
    for steps in (1, 2, 30):
        want = literal_purify(linear_eps, x, ids, steps, seed=2)
        got = fast_chain(linear_eps, x, ids, steps, seed=2)
        assert got.dtype == dtype and torch.equal(got, want)


def test_step_coefficients_reproduce_reverse_step_at_every_kind_of_t():
    x_t = torch.linspace(-2, 2, 2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (0, 1, 17, 500, 999):
        c = step_coefficients(t, SCHEDULE)
        want, x0_want = reverse_step(linear_eps, x_t, t, SCHEDULE, z)
        x0 = ((x_t - c.eps_scale * linear_eps(x_t, torch.full((2,), t))) / c.sqrt_alpha_bar).clamp(-1, 1)
        got = x0 if t == 0 else c.coef_x0 * x0 + c.coef_xt * x_t + c.sigma * z
        assert torch.equal(x0, x0_want) and torch.equal(got, want)
    assert step_coefficients(0, SCHEDULE).sigma == 0.0


def test_fast_chain_matches_the_literal_loop_with_a_unet_in_float64():
    """Channels-last UNet calls, inference mode: only float64 rounding apart from the literal loop."""
    unet, x, ids = tiny_unet(torch.float64), images(6, torch.float64), torch.arange(6)
    want = literal_purify(module_eps(unet), x, ids, steps=4, seed=1)
    got = fast_chain(eps_model(unet), x, ids, steps=4, seed=1)
    assert (got - want).abs().max().item() < 1e-10


def test_diffusion_purify_matches_the_literal_loop_with_a_unet(monkeypatch: pytest.MonkeyPatch):
    """The whole fast path (micro-batches, the last one padded, LeanUNet, float32) against the literal
    whole-batch loop with the module call: float32 rounding only, in either memory format.

    (At 16x16 the deepest level is 1x1 with 4 values per GroupNorm group; at 8x8 it has 2, and the rounding
    differences of the channels-last convolutions grow to ~1e-3 through that normalisation.)"""
    monkeypatch.setitem(diffusion.MICRO_BATCH, "cpu", 16)
    unet, x, ids = tiny_unet(), images(37), torch.arange(100, 137)
    want = literal_purify(module_eps(unet), x, ids, steps=6, seed=5)
    got = diffusion_purify(eps_model(unet), x, ids, steps=6, schedule=SCHEDULE, seed=5)
    assert got.shape == x.shape and got.is_contiguous() and got.abs().max().item() <= 1.0
    assert (got - want).abs().max().item() < 1e-5
    assert not got.is_inference()  # usable by autograd afterwards (PureGen-Reps feeds it to Langevin)
    got.requires_grad_(True)
    monkeypatch.setitem(diffusion.CHANNELS_LAST, "cpu", False)
    nchw = diffusion_purify(eps_model(unet), x, ids, steps=6, schedule=SCHEDULE, seed=5)
    assert (nchw - want).abs().max().item() < 1e-6


def test_diffusion_purify_is_bit_identical_however_batched(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(diffusion.MICRO_BATCH, "cpu", 8)  # several micro-batches, a padded last one
    unet, x, ids = tiny_unet(), images(21), torch.arange(40, 61)

    def purify(rows: slice | Tensor) -> Tensor:
        return diffusion_purify(eps_model(unet), x[rows], ids[rows], steps=3, schedule=SCHEDULE, seed=7)

    whole = purify(slice(None))
    parts = torch.cat([purify(slice(0, 5)), purify(slice(5, 21))])
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    shuffled = torch.empty_like(whole)
    shuffled[perm] = purify(perm)
    assert torch.equal(whole, parts) and torch.equal(whole, shuffled)


def test_inputs_are_not_modified_and_steps_zero_copies():
    x, ids = images(4), torch.arange(4)
    before = x.clone()
    diffusion_purify(linear_eps, x, ids, steps=5, schedule=SCHEDULE, seed=0)
    assert torch.equal(x, before)
    same = diffusion_purify(linear_eps, x, ids, steps=0, schedule=SCHEDULE, seed=0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    assert diffusion_purify(linear_eps, x[:0], ids[:0], steps=5, schedule=SCHEDULE, seed=0).shape == (0, *x.shape[1:])


def module_eps(unet):
    return lambda x_t, t: unet(x_t, t).sample


@pytest.mark.parametrize("cfg", [CFG, DDPMConfig(size="S", in_channels=1, image_size=8, layers_per_block=2),
                                 DDPMConfig(size="S", in_channels=3, image_size=24, layers_per_block=1)])
def test_lean_unet_matches_the_module(cfg: DDPMConfig):
    """The same function: float64 rounding apart in both memory formats, any t per row or one t broadcast;
    the module itself in training mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = build_unet(cfg).double().eval()
    x = torch.rand(5, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.float64) * 2 - 1
    lean = eps_model(unet)
    assert isinstance(lean, LeanUNet)
    with torch.inference_mode():
        for t in (torch.tensor([0, 3, 250, 999, 40]), torch.tensor([17]).expand(5)):
            want = unet(x, t).sample
            for fmt in (torch.contiguous_format, torch.channels_last):
                got = LeanUNet(unet, fmt)(x.contiguous(memory_format=fmt), t)
                assert (got - want).abs().max().item() < 1e-10
    unet.train()
    t = torch.tensor([0, 3, 250, 999, 40])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trained = lean(x, t)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        assert torch.equal(trained, unet(x, t).sample)


def test_lean_unet_sees_parameter_updates():
    unet, x, t = tiny_unet(), images(3), torch.tensor([5, 6, 7])
    lean = LeanUNet(unet, torch.channels_last)
    xx = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = lean(xx, t)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)  # an optimizer step's in-place update
    with torch.inference_mode():
        after, want = lean(xx, t), unet(x, t).sample
    assert not torch.allclose(before, after) and (after - want).abs().max().item() < 1e-5


def test_lean_unet_covers_diffusers_layouts_and_refuses_others():
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        google = UNet2DModel(  # the layout of google/ddpm-cifar10-32, narrower: one attention head, 16x16
            sample_size=16, block_out_channels=(32, 32, 32, 32), layers_per_block=2, norm_eps=1e-6,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
            downsample_padding=0).double().eval()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 500, 999])
    assert lean_supported(google)
    with torch.inference_mode():
        assert (LeanUNet(google)(x, t) - google(x, t).sample).abs().max().item() < 1e-10
    scale_shift = UNet2DModel(sample_size=8, block_out_channels=(32, 32), resnet_time_scale_shift="scale_shift",
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    skip = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D", "SkipDownBlock2D"),
                       up_block_types=("SkipUpBlock2D", "UpBlock2D"))
    centred = UNet2DModel(sample_size=8, block_out_channels=(32, 32), center_input_sample=True,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    for unsupported in (scale_shift, skip, centred):
        assert not lean_supported(unsupported) and not isinstance(eps_model(unsupported), LeanUNet)


def test_diffusion_purify_with_the_module_forward_agrees():
    unet, x, ids = tiny_unet(), images(9), torch.arange(9)
    lean = diffusion_purify(eps_model(unet), x, ids, steps=4, schedule=SCHEDULE, seed=3)
    module = diffusion_purify(module_eps(unet), x, ids, steps=4, schedule=SCHEDULE, seed=3)
    assert (lean - module).abs().max().item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_the_literal_loop_and_is_batch_invariant(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cuda = "cuda"
    unet, x, ids = tiny_unet(torch.float64, cuda), images(6, torch.float64, cuda), torch.arange(6)
    with torch.inference_mode():
        t = ids.to(cuda)
        assert (eps_model(unet)(x, t) - unet(x, t).sample).abs().max().item() < 1e-10
    want = literal_purify(module_eps(unet), x, ids, steps=4, seed=1, schedule=SCHEDULE.to(cuda))
    got = fast_chain(eps_model(unet), x, ids, steps=4, seed=1, schedule=SCHEDULE.to(cuda))
    assert got.device.type == "cuda" and (got - want).abs().max().item() < 1e-10

    unet, schedule = tiny_unet(device=cuda), SCHEDULE.to(cuda)
    x, ids = images(300, device=cuda), torch.arange(300)  # two micro-batches of 256, the last one padded
    whole = diffusion_purify(eps_model(unet), x, ids, steps=3, schedule=schedule, seed=7)
    want = literal_purify(module_eps(unet), x, ids, steps=3, seed=7, schedule=schedule)
    assert (whole - want).abs().max().item() < 1e-4
    parts = torch.cat([diffusion_purify(eps_model(unet), x[s], ids[s], steps=3, schedule=schedule, seed=7)
                       for s in (slice(0, 100), slice(100, 300))])
    assert torch.equal(whole, parts)
