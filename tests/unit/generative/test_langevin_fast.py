"""The fast Langevin purification path (issue #3): same numbers as the literal equation, batch-invariant bit
for bit, same per-sample noise streams, NaN/Inf checks kept."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from puregen_dist.config.generative import LangevinConfig
from puregen_dist.data.transforms import sym_to_uint8
from puregen_dist.generative import langevin_fast
from puregen_dist.generative.ebm import ConvNetEnergy, SNGAN32Energy
from puregen_dist.generative.folded_sngan import FoldedSNGAN32
from puregen_dist.generative.langevin_fast import fast_energy
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise
from puregen_dist.generative.purifiers import EBMPurifier

STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they give on a busy machine (conftest restores them)."""
    torch.set_num_threads(1)


def tiny_energy(dtype: torch.dtype = torch.float32, seed: int = 0) -> SNGAN32Energy:
    """SNGAN-32 energy, nf = 8, one channel (16x16 inputs); biases made non-zero so they are exercised."""
    torch.manual_seed(seed)
    model = SNGAN32Energy(in_channels=1, nf=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.bias.normal_(0.0, 0.05)
    return model.to(dtype)


def images(n: int = 64, dtype: torch.dtype = torch.float32, channels: int = 1, size: int = 16) -> Tensor:
    """(n, C, size, size) in [-1, 1], on the 8-bit grid like real purification inputs."""
    g = torch.Generator().manual_seed(7)
    return (torch.randint(0, 256, (n, channels, size, size), generator=g).to(dtype) / 127.5 - 1.0)


def reference_purify(energy: nn.Module, x: Tensor, ids: Tensor, *, seed: int, cfg: LangevinConfig) -> Tensor:
    """The equation, literally: x ← x − (ε²/2)∇ₓ(G(x)/T) + εz, z from SampleNoise(ids, seed); clamp at the
    end."""
    noise = SampleNoise(ids, seed, STREAM_LANGEVIN)
    x = x.clone()
    for _ in range(cfg.steps):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad((energy(x) / cfg.temperature).sum(), x)
        z = noise.randn(tuple(x.shape[1:]), x.device, x.dtype)
        x = x.detach() - 0.5 * cfg.step_size ** 2 * grad + cfg.step_size * z
    return x.clamp(-1.0, 1.0)


def level_change(a: Tensor, b: Tensor) -> Tensor:
    """|8-bit level of a − 8-bit level of b| per pixel, for purified images in [-1, 1] on any device."""
    return torch.from_numpy(sym_to_uint8(a.cpu()).astype(int) - sym_to_uint8(b.cpu()).astype(int)).abs()


# ------------------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("fold", [True, False])
def test_fast_path_matches_the_reference_equation_float32(fold, monkeypatch):
    monkeypatch.setattr(langevin_fast, "FOLD_POOL", fold)
    energy, x, ids = tiny_energy(), images(), torch.arange(1000, 1064)
    cfg = LangevinConfig(steps=STEPS)
    want = reference_purify(energy, x, ids, seed=11, cfg=cfg)
    got = EBMPurifier(energy, cfg).purify(x, ids, seed=11)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("fold", [True, False])
def test_fast_path_matches_the_reference_equation_float64(fold, monkeypatch):
    """In float64 rounding differences vanish: the fast path is the same computation."""
    monkeypatch.setattr(langevin_fast, "FOLD_POOL", fold)
    energy, x, ids = tiny_energy(torch.float64), images(16, torch.float64), torch.arange(16)
    cfg = LangevinConfig(steps=STEPS)
    want = reference_purify(energy, x, ids, seed=2, cfg=cfg)
    got = EBMPurifier(energy, cfg).purify(x, ids, seed=2)
    assert (got - want).abs().max().item() < 1e-12


def test_convnet_energy_takes_the_generic_fast_path():
    torch.manual_seed(0)
    energy = ConvNetEnergy(in_channels=3, nf=4, image_size=16).double()
    x, ids = images(8, torch.float64, channels=3), torch.arange(8)
    cfg = LangevinConfig(steps=4)
    want = reference_purify(energy, x, ids, seed=0, cfg=cfg)
    assert (EBMPurifier(energy, cfg).purify(x, ids, seed=0) - want).abs().max().item() < 1e-12


def test_folded_sngan_is_the_same_function_and_gradient():
    energy = tiny_energy(torch.float64)
    folded = FoldedSNGAN32(energy)
    x = images(6, torch.float64).requires_grad_(True)
    e_ref, e_fold = energy(x), folded(x)
    (g_ref,) = torch.autograd.grad(e_ref.sum(), x)
    (g_fold,) = torch.autograd.grad(e_fold.sum(), x)
    torch.testing.assert_close(e_fold, e_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_fold, g_ref, rtol=0, atol=1e-13)
    assert not any(p.requires_grad for p in folded.parameters())


def test_fast_energy_leaves_the_module_alone():
    energy = tiny_energy().requires_grad_(False)
    before = {k: v.clone() for k, v in energy.state_dict().items()}
    fast = fast_energy(energy)
    assert fast is not energy and isinstance(fast, FoldedSNGAN32)
    for key, value in energy.state_dict().items():
        assert torch.equal(value, before[key]) and value.is_contiguous()
    assert not FoldedSNGAN32.supports(ConvNetEnergy(1, 4, 16))


def test_a_module_that_is_not_the_published_sngan_is_not_folded(monkeypatch):
    """The probe comparison catches an SNGAN32Energy whose forward no longer matches the folded network."""
    energy = tiny_energy()
    no_final_relu = lambda self, x: self.linear(self.blocks(x).mean(dim=(2, 3)))[:, 0]  # noqa: E731
    monkeypatch.setattr(SNGAN32Energy, "forward", no_final_relu)
    fast = fast_energy(energy)
    assert not isinstance(fast, FoldedSNGAN32)


# ------------------------------------------------------------------------------------------------ batching


def purify_in_batches(purifier: EBMPurifier, x: Tensor, ids: Tensor, order: Tensor, batch: int) -> Tensor:
    """Purify ``x[order]`` in batches of ``batch``, then put the rows back in the original order."""
    out = torch.empty_like(x)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        out[rows] = purifier.purify(x[rows], ids[rows], seed=5)
    return out


@pytest.mark.parametrize("micro_batch", [None, 16])
def test_purification_is_batch_invariant_bit_for_bit(micro_batch, monkeypatch):
    """64 images as one batch, as 4 batches of 16, as uneven batches of 5, and shuffled: identical output.
    (The tiny net's own micro-batch is 64 rows; 16 makes a batch of 64 four micro-batches.)"""
    if micro_batch:
        monkeypatch.setitem(langevin_fast.MICRO_BATCH, "cpu", micro_batch)
    purifier = EBMPurifier(tiny_energy(), LangevinConfig(steps=STEPS))
    x, ids = images(), torch.arange(500, 564)
    whole = purifier.purify(x, ids, seed=5)
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for order, batch in [(torch.arange(64), 16), (torch.arange(64), 5), (shuffled, 64), (shuffled, 16)]:
        again = purify_in_batches(purifier, x, ids, order, batch)
        assert (sym_to_uint8(again) == sym_to_uint8(whole)).all()
        assert torch.equal(again, whole)


def test_noise_blocks_of_several_steps_give_the_same_output(monkeypatch):
    """The accelerator path (noise made 16 steps at a time) changes no number."""
    purifier = EBMPurifier(tiny_energy(), LangevinConfig(steps=20))  # a block of 16, then one of 4
    x, ids = images(24), torch.arange(24)
    per_step = purifier.purify(x, ids, seed=4)
    monkeypatch.setitem(langevin_fast.NOISE_BLOCK_STEPS, "cpu", 16)
    assert torch.equal(purifier.purify(x, ids, seed=4), per_step)


def test_bf16_autocast_stays_close_to_fp32():
    """``precision: bf16`` (meant for CUDA; autocast runs on CPU too) moves purified pixels by at most a few
    8-bit levels of the fp32 result on the tiny net, and most pixels not at all."""
    x, ids = images(16), torch.arange(16)
    fp32 = EBMPurifier(tiny_energy(), LangevinConfig(steps=STEPS)).purify(x, ids, seed=1)
    bf16 = EBMPurifier(tiny_energy(), LangevinConfig(steps=STEPS, precision="bf16")).purify(x, ids, seed=1)
    levels = level_change(bf16, fp32)
    assert not torch.equal(bf16, fp32)
    assert levels.max() <= 3 and levels.float().mean() < 0.2


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        langevin_fast.langevin_purify(tiny_energy(), images(2), torch.arange(2), seed=0, steps=1, step_size=0.1,
                                      temperature=1.0, check_every=1, rows=8, precision="fp16")


def test_micro_batch_size_follows_the_network_and_image_shape_only():
    x = torch.zeros(3, 3, 32, 32)
    assert langevin_fast.micro_batch_size(SNGAN32Energy(3, 128), x) == 32
    assert langevin_fast.micro_batch_size(SNGAN32Energy(3, 32), x) == 64
    assert langevin_fast.micro_batch_size(SNGAN32Energy(3, 128), x[:1]) == 32


def test_noise_depends_on_seed_and_id_not_position():
    purifier = EBMPurifier(tiny_energy(), LangevinConfig(steps=3))
    x = images(2)[:1].expand(2, -1, -1, -1).contiguous()  # the same image twice
    same_ids = purifier.purify(x, torch.tensor([9, 9]), seed=0)
    other_ids = purifier.purify(x, torch.tensor([9, 10]), seed=0)
    assert torch.equal(same_ids[0], same_ids[1]) and torch.equal(other_ids[0], same_ids[0])
    assert not torch.equal(other_ids[1], other_ids[0])
    assert not torch.equal(purifier.purify(x, torch.tensor([9, 9]), seed=1), same_ids)


def test_output_is_clamped_and_zero_steps_is_the_identity():
    x = images(4) * 1.5
    out = EBMPurifier(tiny_energy(), LangevinConfig(steps=2)).purify(x, torch.arange(4), seed=0)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(EBMPurifier(tiny_energy(), LangevinConfig(steps=0)).purify(x, torch.arange(4), seed=0),
                       x.clamp(-1.0, 1.0))


# ------------------------------------------------------------------------------------------------ checks


def test_non_finite_energy_raises_naming_the_step_and_the_sample_ids():
    energy = tiny_energy()
    with torch.no_grad():
        energy.blocks[0].c1.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 3 .*sample ids \[40, 41, 42\]"):
        EBMPurifier(energy, LangevinConfig(steps=3)).purify(images(3), torch.tensor([40, 41, 42]), seed=0)


def test_purify_leaves_its_input_untouched():
    for channels in (1, 3):
        torch.manual_seed(0)
        x = images(5, channels=channels)
        before = x.clone()
        EBMPurifier(SNGAN32Energy(channels, 4), LangevinConfig(steps=2)).purify(x, torch.arange(5), seed=0)
        assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_the_reference_and_is_batch_invariant():
    cuda = torch.device("cuda")
    energy, x, ids = tiny_energy(torch.float64).to(cuda), images(16, torch.float64).to(cuda), torch.arange(16)
    cfg = LangevinConfig(steps=STEPS)
    want = reference_purify(energy, x, ids, seed=2, cfg=cfg)
    got = EBMPurifier(energy, cfg).purify(x, ids, seed=2)
    assert got.device.type == "cuda" and (got - want).abs().max().item() < 1e-12
    purifier = EBMPurifier(tiny_energy().to(cuda), cfg)
    x, ids = images().to(cuda), torch.arange(500, 564)
    whole = purifier.purify(x, ids, seed=5)
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for order, batch in [(torch.arange(64), 16), (shuffled, 5)]:
        assert torch.equal(purify_in_batches(purifier, x, ids, order, batch), whole)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_gives_the_eager_numbers_and_catches_nan():
    cuda = torch.device("cuda")
    x, ids = images(40).to(cuda), torch.arange(40)
    eager = EBMPurifier(tiny_energy().to(cuda), LangevinConfig(steps=STEPS)).purify(x, ids, seed=3)
    graphed = EBMPurifier(tiny_energy().to(cuda), LangevinConfig(steps=STEPS, cuda_graph=True))
    assert torch.equal(graphed.purify(x, ids, seed=3), eager)
    assert torch.equal(purify_in_batches(graphed, x, ids, torch.arange(40), 7), eager)
    energy = tiny_energy().to(cuda)
    with torch.no_grad():
        energy.blocks[0].c1.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 3"):
        EBMPurifier(energy, LangevinConfig(steps=3, cuda_graph=True)).purify(x[:3], ids[:3], seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_stays_close_to_fp32():
    cuda = torch.device("cuda")
    x, ids = images(32).to(cuda), torch.arange(32)
    fp32 = EBMPurifier(tiny_energy().to(cuda), LangevinConfig(steps=STEPS)).purify(x, ids, seed=1)
    for graph in (False, True):
        cfg = LangevinConfig(steps=STEPS, precision="bf16", cuda_graph=graph)
        bf16 = EBMPurifier(tiny_energy().to(cuda), cfg).purify(x, ids, seed=1)
        levels = level_change(bf16, fp32)
        assert levels.max() <= 3 and levels.float().mean() < 0.2
