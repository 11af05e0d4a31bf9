"""Per-sample random streams: noise is a function of (seed, sample id, stream, draw, element), never of batch
position, device or thread.

This is what makes purification independent of how the data is split into batches, blocks or actors
(DESIGN §3). The numbers come from a counter-based generator, Philox4x32-10 (Salmon, Moraes, Dror, Shaw,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011), evaluated as integer tensor ops on the device that
consumes them, followed by the Box–Muller transform:

* key   = two 32-bit words hashed from (seed, stream);
* counter = (block j, draw k, id low 32 bits, id high 32 bits), one Philox call per 4 consecutive elements
  4j … 4j+3 of draw k of sample ``id``;
* each pair of output words (a, b) becomes two normals r·cos θ, r·sin θ with u = (a >> 8 + ½)·2⁻²⁴,
  r = √(−2 ln u), θ = 2π·(b >> 8)·2⁻²⁴ (24-bit uniforms: the integer part is exact on every device, so CPU
  and CUDA agree up to the rounding of ln, √, cos and sin).

No host work, no per-sample generator objects: a whole block of draws of a micro-batch is one batch of tensor
ops, which also lets CUDA graphs capture it. ``NOISE_SOURCE`` names this scheme; artifacts that depend on the
numbers (purified sets) put it in their keys, so changing the scheme never reuses stale results.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

STREAM_LANGEVIN = 1
STREAM_DIFFUSION = 2

NOISE_SOURCE = "philox4x32-10+box-muller-24/v1"
"""Version of the noise scheme; part of every purified set's key (``pipeline.stages.purified_artifact``)."""

PHILOX_ROUNDS = 10
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, √3 − 1)
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def stream_key(seed: int, stream: int) -> tuple[int, int]:
    """The Philox key (k0, k1), two 32-bit words, of (seed, stream), mixed by NumPy's SeedSequence."""
    if seed < 0 or stream < 0:
        raise ValueError(f"noise seed and stream must be non-negative, got seed={seed}, stream={stream}")
    words = np.random.SeedSequence([int(seed), int(stream)]).generate_state(2)
    return int(words[0]), int(words[1])


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a·m, for int64 tensors a in [0, 2³²) and a 32-bit
    constant m. One int64 multiply whose wrap-around keeps the product's 64 bits (two's complement); on a
    device where ``wrapping_multiply_works`` fails, the 16-bit-limb form, which never leaves int64."""
    if _WRAPS.get(a.device.type, False):
        product = a * m
        return (product >> 32) & _MASK32, product & _MASK32
    return _mulhilo_limbs(a, m)


def _mulhilo_limbs(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``_mulhilo`` in 16-bit limbs: every intermediate below 2⁵⁰."""
    m_hi, m_lo = m >> 16, m & _MASK16
    a_hi, a_lo = a >> 16, a & _MASK16
    lo = (a_lo * m + ((a_hi * m_lo) << 16)) & _MASK32
    hi = a_hi * m_hi + ((a_hi * m_lo + a_lo * m_hi + ((a_lo * m_lo) >> 16)) >> 16)
    return hi, lo


_WRAPS: dict[str, bool] = {}


def wrapping_multiply_works(device: torch.device) -> bool:
    """Whether int64 products on ``device`` wrap modulo 2⁶⁴ (checked once per device type against the limb
    form on values whose products overflow; cached). Integer overflow is undefined in C++, so this is
    measured rather than assumed."""
    if device.type not in _WRAPS:
        a = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x9E3779B9], dtype=torch.int64, device=device)
        product = a * _M1
        fast = ((product >> 32) & _MASK32, product & _MASK32)
        _WRAPS[device.type] = all(torch.equal(f, s) for f, s in zip(fast, _mulhilo_limbs(a, _M1), strict=True))
    return _WRAPS[device.type]


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of broadcastable int64 counter words in [0, 2³²): four int64 words in [0, 2³²).

    Matches Random123's known-answer vectors (tests/unit/generative/test_noise.py).
    """
    c0, c1, c2, c3 = counter
    wrapping_multiply_works(c0.device)
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(a: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two standard normals from two 32-bit words (24-bit uniforms; u in (0, 1), never 0)."""
    scale = 2.0 ** -24
    u = ((a >> 8).to(dtype) + 0.5) * scale
    theta = (b >> 8).to(dtype) * (2.0 * math.pi * scale)
    radius = torch.sqrt(-2.0 * torch.log(u))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def gaussian(ids: Tensor, key: tuple[int, int], draws: Tensor, numel: int,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normals of draws ``draws`` of each sample's stream: (B, K, numel), on ``ids``' device.

    Args:
        ids: (B,) int64 sample ids (any device; the numbers are made there).
        key: ``stream_key(seed, stream)``.
        draws: (K,) int64 draw indices (k-th draw = k-th step's noise), on ``ids``' device; a tensor so that a
            captured CUDA graph can advance it in place.
        numel: elements per draw (C·H·W).
        dtype: float32 or float64 (the same uniforms; float64 only rounds the transform differently).
    """
    blocks = (numel + 3) // 4
    device = ids.device
    ids = ids.to(torch.int64)
    c0 = torch.arange(blocks, dtype=torch.int64, device=device).view(1, 1, blocks)
    c1 = (draws.to(device=device, dtype=torch.int64) & _MASK32).view(1, -1, 1)
    c2 = (ids & _MASK32).view(-1, 1, 1)
    c3 = ((ids >> 32) & _MASK32).view(-1, 1, 1)
    shape = (ids.shape[0], c1.shape[1], blocks)
    # broadcast, not expanded: Philox's first round runs on the small factors of the counter
    w0, w1, w2, w3 = (w.expand(shape) for w in philox4x32((c0, c1, c2, c3), key))
    z0, z1 = _box_muller(w0, w1, dtype)
    z2, z3 = _box_muller(w2, w3, dtype)
    return torch.stack((z0, z1, z2, z3), dim=-1).view(*shape[:2], 4 * blocks)[..., :numel]


class SampleNoise:
    """Independent Gaussian streams, one per sample, drawn in order: the k-th ``randn`` call returns draw k.

    Args:
        ids: (B,) int sample ids.
        seed: experiment-level seed (>= 0).
        stream: separates uses (Langevin vs diffusion) so they never share numbers.
    """

    def __init__(self, ids: Tensor | np.ndarray, seed: int, stream: int) -> None:
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not isinstance(ids, Tensor) else ids,
                                   dtype=torch.int64)
        self.key = stream_key(seed, stream)
        self.drawn = 0

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard normal, row b = the next draw of sample b's stream, made on ``device``."""
        return self.block(1, shape, device, dtype)[:, 0]

    def block(self, draws: int, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
        """The next ``draws`` draws at once: (B, draws, *shape), equal to ``draws`` ``randn`` calls."""
        device = torch.device(device)
        indices = torch.arange(self.drawn, self.drawn + draws, dtype=torch.int64, device=device)
        self.drawn += draws
        numel = math.prod(shape)
        z = gaussian(self.ids.to(device), self.key, indices, numel, dtype)
        return z.view(self.ids.shape[0], draws, *shape)
