"""The fast execution path of Langevin purification (issue #3): the update of
:func:`puregen_dist.generative.langevin.langevin_step`, organised for speed.

What changes is only how the numbers are computed, never which numbers (benchmarks/RESULTS.md):

* fixed-size micro-batches (``micro_batch_size``), each run through all its steps, the last one padded, so a
  row's result is bit-identical however the images are batched;
* a frozen, channels-last, pool-folded copy of the network (``fast_energy``, :mod:`.folded_sngan`);
* per-sample noise drawn in blocks of steps (``draw_noise``), ahead of the chain on accelerators;
* the state updated in place as one leaf tensor, NaN/Inf checks every ``check_every`` steps.

:func:`langevin_purify` is the one loop that purifies; diagnostics watch it through a
:class:`~puregen_dist.generative.langevin.StepObserver`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from puregen_dist.generative.folded_sngan import FoldedSNGAN32, folds_exactly
from puregen_dist.generative.langevin import EnergyFn, StepObserver, check_finite
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise

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
                    temperature: float, check_every: int, rows: int,
                    observer: StepObserver | None = None) -> Tensor:
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
        observer: called with t = 0 … steps for each micro-batch in turn (``rows`` = its positions in
            ``x``); see :class:`StepObserver`. None: no call, no cost. It changes no number of the output.
    """
    out = torch.empty_like(x)
    with _fixed_kernels(x.device):
        for start in range(0, x.shape[0], rows):
            part = slice(start, min(start + rows, x.shape[0]))
            out[part] = _chain(energy_fn, x[part], ids[part], part, seed=seed, rows=rows, steps=steps,
                               step_size=step_size, temperature=temperature, check_every=check_every,
                               observer=observer)
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


def _chain(energy_fn: EnergyFn, x: Tensor, ids: Tensor, part: slice, *, seed: int, rows: int, steps: int,
           step_size: float, temperature: float, check_every: int, observer: StepObserver | None) -> Tensor:
    """All ``steps`` of one micro-batch (b <= rows real rows at ``part`` of the batch, padded to ``rows``):
    (b, C, H, W) -> same."""
    real = x.shape[0]
    noise = SampleNoise(ids, seed, STREAM_LANGEVIN)
    drift = 0.5 * step_size * step_size / temperature  # (ε²/2)·∇(G/T) = drift·∇G
    state = _pad_rows(x.detach(), rows).clone(memory_format=memory_format_for(x.device))  # not the caller's
    state.requires_grad_(True)  # a leaf updated in place under no_grad: no per-step graph inputs to build
    blocks = noise_blocks(noise, tuple(x.shape[1:]), steps, x.dtype, rows=rows, device=x.device)
    for first, z in zip(range(0, steps, NOISE_BLOCK_STEPS), blocks, strict=True):
        for k in range(z.shape[1]):
            energy, grad = _energy_grad(energy_fn, state)  # G(x_t), ∇G(x_t) for t = first + k
            if observer is not None:
                observer(first + k, part, state.detach()[:real], energy[:real])
            with torch.no_grad():  # x_{t+1} = x_t − drift·∇G(x_t) + ε z_t
                state.add_(grad, alpha=-drift).add_(z[:, k], alpha=step_size)
            step = first + k + 1
            if step % check_every == 0 or step == steps:
                check_finite(energy[:real], grad[:real], where=f"purification Langevin step {step}", ids=ids)
    if observer is not None:
        observer(steps, part, state.detach()[:real], None)
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
