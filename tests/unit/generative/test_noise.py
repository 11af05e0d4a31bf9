"""The counter-based per-sample noise (issue 15): Philox4x32-10 bit for bit, Gaussian statistics, independence
across ids, draws and elements, draws independent of blocking and device."""

from __future__ import annotations

import math

import pytest
import torch

from puregen_dist.generative import noise
from puregen_dist.generative.noise import (
    STREAM_DIFFUSION,
    STREAM_LANGEVIN,
    SampleNoise,
    gaussian,
    philox4x32,
    stream_key,
)

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> result[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _words(values: tuple[int, ...], device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor([v], dtype=torch.int64, device=device) for v in values)


@pytest.mark.parametrize("limbs", [False, True])
def test_philox_matches_the_random123_known_answers(limbs, monkeypatch):
    if limbs:  # the fallback for a device whose int64 products do not wrap
        monkeypatch.setattr(noise, "_WRAPS", {"cpu": False})
        monkeypatch.setattr(noise, "wrapping_multiply_works", lambda device: False)
    for counter, key, want in KAT:
        assert tuple(int(w) for w in philox4x32(_words(counter), key)) == want


def test_wrapping_and_limb_products_agree_on_random_words():
    a = torch.randint(0, 2 ** 32, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    assert noise.wrapping_multiply_works(a.device)
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF):
        product = a * m
        hi, lo = noise._mulhilo_limbs(a, m)
        assert torch.equal(hi, (product >> 32) & 0xFFFFFFFF) and torch.equal(lo, product & 0xFFFFFFFF)
        assert hi.max() < 2 ** 32 and lo.min() >= 0


def test_gaussian_statistics():
    """1.5M draws: mean 0, variance 1, normal tails and shape, to within a few standard errors."""
    z = gaussian(torch.arange(64), stream_key(0, STREAM_LANGEVIN), torch.arange(8), 3 * 32 * 32).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3.0) < 0.05  # kurtosis
    for q, p in ((1.0, 0.841345), (1.959964, 0.975), (-2.575829, 0.005)):
        assert abs((z < q).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert z.abs().max() < 6.0  # 24-bit uniforms: |z| <= sqrt(2 ln 2^25) = 5.89


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_streams_are_uncorrelated_across_ids_draws_elements_seeds_and_streams():
    numel = 3 * 32 * 32
    z = gaussian(torch.tensor([0, 1, 2, 2 ** 32, 2 ** 32 + 1]), stream_key(7, STREAM_LANGEVIN), torch.arange(40),
                 numel)
    bound = 5 / math.sqrt(40 * numel)
    for i, j in ((0, 1), (1, 2), (0, 3), (3, 4)):  # neighbouring ids, ids that differ only in the high word
        assert abs(_corr(z[i], z[j])) < bound
    assert abs(_corr(z[:, 1:], z[:, :-1])) < 5 / math.sqrt(z[:, 1:].numel())  # consecutive draws
    assert abs(_corr(z[..., 1:], z[..., :-1])) < 5 / math.sqrt(z[..., 1:].numel())  # neighbouring elements
    pairs = z[..., : numel // 2 * 2].reshape(5, 40, -1, 2)  # the two outputs of one Box-Muller pair
    assert abs(_corr(pairs[..., 0], pairs[..., 1])) < 5 / math.sqrt(pairs[..., 0].numel())
    other_seed = gaussian(torch.tensor([0]), stream_key(8, STREAM_LANGEVIN), torch.arange(40), numel)
    other_stream = gaussian(torch.tensor([0]), stream_key(7, STREAM_DIFFUSION), torch.arange(40), numel)
    assert abs(_corr(z[0], other_seed[0])) < bound and abs(_corr(z[0], other_stream[0])) < bound


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 5, 5), (7,)])
def test_block_draws_equal_successive_draws_and_depend_on_the_id_only(shape):
    ids = torch.tensor([5, 0, 123456])
    one, block = SampleNoise(ids, 3, STREAM_LANGEVIN), SampleNoise(ids, 3, STREAM_LANGEVIN)
    want = torch.stack([one.randn(shape) for _ in range(5)], dim=1)
    got = torch.cat([block.block(2, shape), block.block(3, shape)], dim=1)
    assert got.shape == (3, 5, *shape) and torch.equal(got, want)
    alone = SampleNoise(ids[1:2], 3, STREAM_LANGEVIN).block(5, shape)  # another batch, another position
    assert torch.equal(alone[0], want[1])


def test_float64_draws_are_the_float32_draws_rounded_differently():
    ids, key = torch.arange(4), stream_key(1, STREAM_DIFFUSION)
    z32 = gaussian(ids, key, torch.arange(3), 100)
    z64 = gaussian(ids, key, torch.arange(3), 100, torch.float64)
    assert z64.dtype == torch.float64 and (z64 - z32.double()).abs().max() < 1e-5


def test_same_numbers_with_any_thread_count():
    ids, key = torch.arange(32), stream_key(2, STREAM_LANGEVIN)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gaussian(ids, key, torch.arange(4), 3072)
        torch.set_num_threads(2)
        assert torch.equal(gaussian(ids, key, torch.arange(4), 3072), one)
    finally:
        torch.set_num_threads(before)


def test_a_negative_seed_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        stream_key(-1, STREAM_LANGEVIN)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws_up_to_rounding():
    for counter, key, want in KAT:
        assert tuple(int(w) for w in philox4x32(_words(counter, "cuda"), key)) == want
    ids = torch.tensor([0, 9, 2 ** 40])
    cpu = SampleNoise(ids, 5, STREAM_LANGEVIN).block(16, (3, 32, 32))
    cuda = SampleNoise(ids, 5, STREAM_LANGEVIN).block(16, (3, 32, 32), device="cuda")
    assert cuda.device.type == "cuda" and (cuda.cpu() - cpu).abs().max() < 1e-5
