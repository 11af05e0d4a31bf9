"""Langevin dynamics on an energy G_θ (PUREGEN_REFERENCE §1.2.6, §1.3), pure functions.

One step (the paper's x ← x − Δτ ∇G̃ + √(2Δτ) z with G̃ = G/T and Δτ = ε²/2):

    x ← x − (ε² / 2) ∇ₓ (G(x) / T) + ε z,    z ~ N(0, I)

with ε = 1.25e-2, T = 1e-4 by default (drift 0.78125 on ∇G, per-step noise std 0.0125 in [-1, 1] space).
Gradients are taken with respect to the input only; no clipping inside the chain.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from puregen_dist.generative.ebm import DBlock, OptimizedDBlock, SNGAN32Energy
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise

log = logging.getLogger(__name__)

EnergyFn = Callable[[Tensor], Tensor]
"""(B, C, H, W) -> (B,) energies."""


def energy_and_grad(energy_fn: EnergyFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """(G(x), ∇ₓ Σ_b G(x_b)): energies (B,) and the per-sample input gradient (B, C, H, W).

    The energy nets have no batch-coupled layers, so the gradient of the batch sum is each sample's own
    gradient.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        energy = energy_fn(x)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), grad


def langevin_step(energy_fn: EnergyFn, x: Tensor, step_size: float, temperature: float,
                  noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Langevin update.

    Args:
        energy_fn: G_θ, (B, C, H, W) -> (B,).
        x: (B, C, H, W) current state, [-1, 1] space (not clipped).
        step_size: ε > 0.
        temperature: T > 0.
        noise: (B, C, H, W) standard normal z.

    Returns:
        (x_next, energies G(x) at the current state (B,), gradient ∇ₓ(G/T) (B, C, H, W)).
    """
    energy, grad = energy_and_grad(energy_fn, x)
    grad = grad / temperature
    # x ← x − (ε²/2) ∇ₓ(G/T) + ε z
    x_next = x.detach() - (0.5 * step_size * step_size) * grad + step_size * noise
    return x_next, energy, grad


def check_finite(energy: Tensor, grad: Tensor, *, where: str, ids: Tensor | None = None) -> None:
    """Raise FloatingPointError naming ``where`` and the offending sample ids if energies/gradients are
    NaN/Inf."""
    bad = ~torch.isfinite(energy) | ~torch.isfinite(grad.flatten(1)).all(dim=1)
    if bool(bad.any()):
        which = (ids[bad.cpu()] if ids is not None else torch.nonzero(bad).flatten()).tolist()[:10]
        label = "sample ids" if ids is not None else "batch rows"
        raise FloatingPointError(f"non-finite EBM energy or gradient at {where} ({label} {which}); "
                                 "lower the temperature ratio / step size or check the checkpoint")


# ------------------------------------------------------------------------------------------ fast purification
# EBMPurifier's chain (§1.3): the same update as ``langevin_step``, organised for speed. What changes is only
# how the numbers are computed, never which numbers: see ``langevin_purify`` and benchmarks/RESULTS.md.

NOISE_BLOCK_STEPS = 16
"""Steps of noise per generator call: one (k, C, H, W) draw instead of k (C, H, W) draws, same numbers."""

MICRO_BATCH: dict[str, int] = {"cuda": 256}
"""Rows per forward/backward call, by device type; other devices (CPU): ``MICRO_BATCH_BYTES``. Every call
has exactly this many rows (the last micro-batch is padded), so a row's numbers never depend on the batch it
came in: convolution kernels pick different blockings, hence roundings, for different batch sizes."""

MICRO_BATCH_BYTES = 16 << 20
"""Without a ``MICRO_BATCH`` entry: the largest power of two of rows in [8, 64] whose widest activation
(first conv's width x H x W) fits in this many bytes: 32 rows for SNGAN-32 nf = 128 at 32x32, 64 for nf = 32.
Small enough to stay in cache, large enough to keep the number of parallel regions (OpenMP barriers) low on
a busy machine. A function of the network and the image shape only."""

CHANNELS_LAST: dict[str, bool] = {"cpu": True, "cuda": True}
"""Run the energy in channels-last memory format, by device type (faster with oneDNN on CPU and with cuDNN
on an H200; see benchmarks/RESULTS.md)."""

FOLD_POOL = True
"""Evaluate an ``SNGAN32Energy`` as ``FoldedSNGAN32``: the same function, about 40 % fewer FLOPs."""

NOISE_THREADS: dict[str, int] = {"cpu": 0, "cuda": min(8, os.cpu_count() or 1)}
"""Worker threads drawing noise ahead of the chain, by device type (0: inline). On an accelerator the
per-sample CPU generators are otherwise the bottleneck; on CPU they would take cores from the convolutions."""

_NORMAL_BLOCK = 16  # torch's CPU normal sampler transforms its uniforms in independent blocks of 16


def block_draws_match(numel: int, dtype: torch.dtype) -> bool:
    """Whether one (k, numel) ``torch.randn`` draw from a CPU generator equals k successive (numel,) draws.

    True when ``numel`` is a multiple of 16 (checked once per dtype against this torch build); otherwise the
    sampler recomputes a trailing block of 16 per call and the two schemes give different numbers.
    """
    return numel % _NORMAL_BLOCK == 0 and _block_draws_match(dtype)


@functools.cache
def _block_draws_match(dtype: torch.dtype) -> bool:
    """Check on this torch build that a (3, 32) draw equals three (32,) draws of the same generator."""
    one = torch.Generator().manual_seed(1234)
    many = torch.Generator().manual_seed(1234)
    block = torch.randn((3, 2 * _NORMAL_BLOCK), generator=one, dtype=dtype)
    rows = torch.stack([torch.randn(2 * _NORMAL_BLOCK, generator=many, dtype=dtype) for _ in range(3)])
    return torch.equal(block, rows)


def draw_noise(noise: SampleNoise, shape: tuple[int, ...], steps: int, dtype: torch.dtype, *,
               rows: int | None = None, pin: bool = False, threads: int = 0) -> Tensor:
    """The next ``steps`` draws of every sample's stream, on CPU: (rows, steps, *shape), row b = sample b.

    Row b equals ``steps`` successive ``noise.randn(shape)`` draws of its stream, bit for bit: one generator
    call per sample when ``block_draws_match`` allows it, else one per step. Rows past the B samples (padding
    up to ``rows``) are zero. ``pin``: page-locked memory, for asynchronous copies to an accelerator.
    ``threads`` > 0: samples are split over that many worker threads (the generators are independent).
    """
    count = len(noise.generators)
    buf = torch.empty((max(rows or count, count), steps, *shape), dtype=dtype, pin_memory=pin)
    buf[count:].zero_()
    whole = block_draws_match(math.prod(shape), dtype)

    def fill(first: int, stop: int) -> None:
        for b in range(first, stop):
            gen = noise.generators[b]
            if whole:
                torch.randn((steps, *shape), generator=gen, dtype=dtype, out=buf[b])
            else:
                for k in range(steps):
                    torch.randn(shape, generator=gen, dtype=dtype, out=buf[b, k])

    if threads <= 1 or count < 2:
        fill(0, count)
    else:
        bounds = [count * i // threads for i in range(threads + 1)]
        list(_pool("noise", threads).map(fill, bounds[:-1], bounds[1:]))
    return buf


@functools.cache
def _pool(name: str, threads: int) -> ThreadPoolExecutor:
    """A process-wide thread pool (created on first use)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"puregen-{name}")


def noise_blocks(noise: SampleNoise, shape: tuple[int, ...], steps: int, dtype: torch.dtype, *, rows: int,
                 device: torch.device) -> Iterator[Tensor]:
    """``draw_noise`` blocks of ``NOISE_BLOCK_STEPS`` steps (the last one shorter), on ``device``:
    (rows, k, *shape) each, in stream order. Where ``NOISE_THREADS`` gives the device worker threads, each
    block is drawn (in parallel over samples) and copied while the chain consumes the previous one."""
    sizes = [min(NOISE_BLOCK_STEPS, steps - first) for first in range(0, steps, NOISE_BLOCK_STEPS)]
    threads = NOISE_THREADS.get(device.type, 0)
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None  # the consumer's stream, for the copies

    def draw(k: int) -> Tensor:
        z = draw_noise(noise, shape, k, dtype, rows=rows, pin=cuda, threads=threads)
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            return z.to(device, non_blocking=True)

    if threads <= 0 or not sizes:
        yield from (draw(k) for k in sizes)
        return
    prefetch = _pool("prefetch", 1)
    ahead = prefetch.submit(draw, sizes[0])
    for following in sizes[1:]:
        z = ahead.result()
        ahead = prefetch.submit(draw, following)  # submitted only now: each stream is drawn strictly in order
        yield z
    yield ahead.result()


def micro_batch_size(energy: nn.Module, x: Tensor) -> int:
    """Rows per energy call for images shaped like ``x`` (B, C, H, W) on its device (``MICRO_BATCH``,
    else ``MICRO_BATCH_BYTES``)."""
    if x.device.type in MICRO_BATCH:
        return MICRO_BATCH[x.device.type]
    width = next((m.out_channels for m in energy.modules() if isinstance(m, nn.Conv2d)), x.shape[1])
    row_bytes = width * x.shape[2] * x.shape[3] * x.element_size()
    rows = 8
    while rows < 64 and 2 * rows * row_bytes <= MICRO_BATCH_BYTES:
        rows *= 2
    return rows


def memory_format_for(device: torch.device) -> torch.memory_format:
    """channels_last where ``CHANNELS_LAST`` asks for it on ``device``, else contiguous."""
    return torch.channels_last if CHANNELS_LAST.get(device.type, False) else torch.contiguous_format


def langevin_purify(energy_fn: EnergyFn, x: Tensor, ids: Tensor, *, seed: int, steps: int, step_size: float,
                    temperature: float, check_every: int, rows: int) -> Tensor:
    """``steps`` Langevin updates from ``x`` (zero initial noise), unclamped: (B, C, H, W) -> (B, C, H, W).

    Same numbers as iterating ``langevin_step`` with ``SampleNoise(ids, seed, STREAM_LANGEVIN)`` draws, up to
    float rounding; rows are processed in micro-batches of exactly ``rows`` (the last one padded), each run
    through all its steps before the next, so every row's result depends only on (row, its id, seed), bit for
    bit, as long as ``rows`` does not depend on the batch (``micro_batch_size``).

    Args:
        energy_fn: G_θ, (N, C, H, W) -> (N,), parameters frozen (see ``fast_energy``).
        x: (B, C, H, W) start, [-1, 1] space, on the energy's device.
        ids: (B,) sample ids (noise streams; named in errors).
        seed: experiment seed.
        steps, step_size, temperature: the chain (§1.2.6).
        check_every: steps between NaN/Inf checks (and after the last step); raise FloatingPointError.
        rows: micro-batch size.
    """
    out = torch.empty_like(x)
    with _fixed_kernels(x.device):
        for start in range(0, x.shape[0], rows):
            part = slice(start, min(start + rows, x.shape[0]))
            out[part] = _chain(energy_fn, x[part], ids[part], seed=seed, rows=rows, steps=steps,
                               step_size=step_size, temperature=temperature, check_every=check_every)
    return out


@contextlib.contextmanager
def _fixed_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA: deterministic cuDNN algorithms, chosen without benchmarking, so that equal inputs give equal
    bits in every call (other cuDNN settings, TF32 included, are left as they are; restored on exit)."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def _chain(energy_fn: EnergyFn, x: Tensor, ids: Tensor, *, seed: int, rows: int, steps: int, step_size: float,
           temperature: float, check_every: int) -> Tensor:
    """All ``steps`` of one micro-batch (b <= rows real rows, padded to ``rows``): (b, C, H, W) -> same."""
    real = x.shape[0]
    noise = SampleNoise(ids, seed, STREAM_LANGEVIN)
    drift = 0.5 * step_size * step_size / temperature  # (ε²/2)·∇(G/T) = drift·∇G
    state = _pad_rows(x.detach(), rows).clone(memory_format=memory_format_for(x.device))  # not the caller's
    state.requires_grad_(True)  # a leaf updated in place under no_grad: no per-step graph inputs to build
    blocks = noise_blocks(noise, tuple(x.shape[1:]), steps, x.dtype, rows=rows, device=x.device)
    for first, z in zip(range(0, steps, NOISE_BLOCK_STEPS), blocks):
        for k in range(z.shape[1]):
            energy, grad = _energy_grad(energy_fn, state)
            with torch.no_grad():
                state.add_(grad, alpha=-drift).add_(z[:, k], alpha=step_size)
            step = first + k + 1
            if step % check_every == 0 or step == steps:
                check_finite(energy[:real], grad[:real], where=f"purification Langevin step {step}", ids=ids)
    return state.detach()[:real]


def _energy_grad(energy_fn: EnergyFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """(G(x) (N,), ∇ₓ Σ G (N, C, H, W)) for a leaf ``x`` that requires grad."""
    with torch.enable_grad():
        energy = energy_fn(x)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), grad


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """(b, ...) -> (rows, ...): ``t`` then copies of its last row (rows >= b; their results are unused)."""
    missing = rows - t.shape[0]
    return t if missing <= 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])


# ------------------------------------------------------------------------------------------ fast energies


def fast_energy(energy: nn.Module) -> nn.Module:
    """A frozen evaluation copy of ``energy`` for ``langevin_purify``: the same function G, computed faster.

    ``SNGAN32Energy`` becomes ``FoldedSNGAN32`` when ``FOLD_POOL`` is set and the fold reproduces the module
    (``folds_exactly``); the copy is in channels-last format where ``CHANNELS_LAST`` asks for it. ``energy``
    itself is not modified. The choice depends on the module alone, never on the data being purified.
    """
    device = next(energy.parameters()).device
    fmt = memory_format_for(device)
    if FOLD_POOL and folds_exactly(energy):
        return FoldedSNGAN32(energy).to(memory_format=fmt)
    if fmt == torch.contiguous_format:
        return energy
    return copy.deepcopy(energy).eval().requires_grad_(False).to(memory_format=fmt)


_FOLD_VERDICTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], bool]] = (
    weakref.WeakKeyDictionary())


def folds_exactly(energy: nn.Module) -> bool:
    """Whether ``FoldedSNGAN32(energy)`` computes ``energy``'s function: the module is laid out as §1.1.3
    and both agree in float64, on CPU, on a fixed probe (two 8x8 inputs) to 1e-9 relative. A mismatch (say, a
    changed ``SNGAN32Energy.forward``) is logged once. Cached per module until its parameters change."""
    if not FoldedSNGAN32.supports(energy):
        return False
    key = tuple((p.data_ptr(), p._version) for p in energy.parameters())
    cached = _FOLD_VERDICTS.get(energy)
    if cached is None or cached[0] != key:
        verdict = _fold_matches_in_float64(energy)
        if not verdict:
            log.warning("folded SNGAN-32 energy disagrees with the module; using the unfolded network")
        _FOLD_VERDICTS[energy] = cached = (key, verdict)
    return cached[1]


def _fold_matches_in_float64(energy: nn.Module) -> bool:
    """The float64 comparison of ``folds_exactly`` (NaN parameters: NaN matches NaN)."""
    plain = copy.deepcopy(energy).to("cpu", torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((2, plain.blocks[0].c1.in_channels, 8, 8), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        want, got = plain(2 * probe - 1), FoldedSNGAN32(plain)(2 * probe - 1)
    if want.shape != got.shape:
        return False
    scale = float(torch.nan_to_num(want.abs(), nan=0.0, posinf=0.0).max())
    return torch.allclose(got, want, rtol=1e-9, atol=1e-9 * max(scale, 1e-12), equal_nan=True)


def _fold_pool_into_conv(weight: Tensor) -> Tensor:
    """conv k×k (stride 1, padding p) followed by avgpool 2 == conv (k+1)×(k+1), stride 2, padding p.

    (O, I, k, k) -> (O, I, k+1, k+1): the kernel convolved with the 2×2 box filter / 4, summed in float64.
    """
    w = weight.detach().double()
    k = w.shape[-1]
    out = w.new_zeros(*w.shape[:2], k + 1, k + 1)
    for di in (0, 1):
        for dj in (0, 1):
            out[..., di:di + k, dj:dj + k] += w
    return (0.25 * out).to(weight.dtype)


class FoldedSNGAN32(nn.Module):
    """``SNGAN32Energy`` evaluated with fewer FLOPs; the same function of the same (frozen) parameters.

    Linear maps commute with average pooling, so in the two downsampling blocks ``avgpool2(conv3x3(h))``
    becomes one conv4x4/stride 2 (``_fold_pool_into_conv``; 16/9·¼ of the MACs) and the shortcut
    ``avgpool2(conv1x1(x))`` becomes ``conv1x1(avgpool2(x))`` (¼ of the MACs). The input gradient is then the
    same gradient as the module's, up to float rounding. (N, C, H, W) in [-1, 1] -> (N,), H and W even.
    """

    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        first, second, *rest = energy.blocks
        self.down = nn.ModuleList([_FoldedDown(first, pre_relu=False), _FoldedDown(second, pre_relu=True)])
        self.rest = nn.ModuleList(_Residual(block) for block in rest)
        self.head = copy.deepcopy(energy.linear)
        self.eval().requires_grad_(False)

    @staticmethod
    def supports(energy: nn.Module) -> bool:
        """Whether ``energy`` is an ``SNGAN32Energy`` laid out as §1.1.3 (two downsampling blocks first)."""
        if type(energy) is not SNGAN32Energy or len(energy.blocks) < 2:
            return False
        first, second, *rest = energy.blocks
        return (type(first) is OptimizedDBlock and type(second) is DBlock and second.downsample
                and second.c_sc is not None and all(type(b) is DBlock and not b.downsample for b in rest))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.down:
            x = block(x)
        for block in self.rest:
            x = block(x)
        return self.head(F.relu(x, inplace=True).mean(dim=(2, 3))).squeeze(1)


# ReLUs here run in place where their input is a fresh conv or sum output that nothing else reads (a conv
# saves its input for backward, not its output): one activation-sized allocation and pass fewer each.


class _Residual(nn.Module):
    """A non-downsampling D-block: conv3x3(ReLU(conv3x3(ReLU x))) + shortcut (identity or conv1x1)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.c1, self.c2, self.c_sc = (copy.deepcopy(m) for m in (block.c1, block.c2, block.c_sc))

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x)), inplace=True))
        return h + (x if self.c_sc is None else self.c_sc(x))


class _FoldedDown(nn.Module):
    """A downsampling D-block, pools folded: conv4x4/2(ReLU(conv3x3([ReLU] x))) + conv1x1(avgpool2(x))."""

    def __init__(self, block: nn.Module, *, pre_relu: bool) -> None:
        super().__init__()
        self.pre_relu = pre_relu
        self.c1 = copy.deepcopy(block.c1)
        conv = block.c2
        self.c2 = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0] + 1, stride=2,
                            padding=conv.padding, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.c2.weight.copy_(_fold_pool_into_conv(conv.weight))
            self.c2.bias.copy_(conv.bias)
        self.c_sc = copy.deepcopy(block.c_sc)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x) if self.pre_relu else x), inplace=True))
        return h + self.c_sc(F.avg_pool2d(x, 2))
