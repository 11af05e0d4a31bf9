"""The fast execution path of Langevin purification (issue #3, #15): the update of
:func:`puregen_dist.generative.langevin.langevin_step`, organised for speed.

What changes is only how the numbers are computed, never which numbers (benchmarks/RESULTS.md,
docs/performance.md):

* fixed-size micro-batches (``micro_batch_size``), each run through all its steps, the last one padded, so a
  row's result is bit-identical however the images are batched;
* a frozen, channels-last, pool-folded copy of the network (``fast_energy``, :mod:`.folded_sngan`);
* per-sample noise from a counter-based generator made on the chain's device (:mod:`.noise`): no host work;
* the state updated in place as one leaf tensor, NaN/Inf checks every ``check_every`` steps;
* optional, on CUDA: one Langevin step captured as a CUDA graph and replayed (``cuda_graph``), and bf16
  autocast of the energy's forward and backward (``precision: bf16``, which does change the numbers slightly).

:func:`langevin_purify` is the one loop that purifies; diagnostics watch it through a
:class:`~puregen_dist.generative.langevin.StepObserver`.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import Tensor, nn

from puregen_dist.generative.folded_sngan import FoldedSNGAN32, folds_exactly
from puregen_dist.generative.langevin import EnergyFn, StepObserver, check_finite
from puregen_dist.generative.micro_batches import fixed_kernels, pad_rows
from puregen_dist.generative.noise import STREAM_LANGEVIN, SampleNoise, gaussian, stream_key

PRECISIONS = ("fp32", "bf16")
"""Arithmetic of the energy's forward and backward: fp32, or bf16 autocast (the state stays fp32)."""

NOISE_BLOCK_STEPS: dict[str, int] = {"cuda": 16}
"""Steps of noise made per generator call, by device type (default 1): on an accelerator a block amortises
the generator's kernel launches; on CPU one step's noise stays in cache. Same numbers either way."""

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
on an H200; see docs/benchmarks_history.md)."""

FOLD_POOL = True
"""Evaluate an ``SNGAN32Energy`` as ``FoldedSNGAN32``: the same function, about 40 % fewer FLOPs."""

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
                    temperature: float, check_every: int, rows: int, precision: str = "fp32",
                    cuda_graph: bool = False, observer: StepObserver | None = None) -> Tensor:
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
        precision: "fp32", or "bf16" (autocast of the energy's forward and backward; not bit-equal to fp32).
        cuda_graph: on CUDA, capture one step once per call and replay it (same numbers as without); ignored
            on other devices and when an observer is given.
        observer: called with t = 0 … steps for each micro-batch in turn (``rows`` = its positions in
            ``x``); see :class:`StepObserver`. None: no call, no cost. It changes no number of the output.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = torch.empty_like(x)
    ids = torch.as_tensor(ids)
    update = _Update(energy_fn, 0.5 * step_size * step_size / temperature, step_size, precision)
    with fixed_kernels(x.device):
        graphed = (_GraphedChain(update, x, rows, seed)
                   if cuda_graph and x.device.type == "cuda" and observer is None and x.shape[0] else None)
        for start in range(0, x.shape[0], rows):
            part = slice(start, min(start + rows, x.shape[0]))
            if graphed is not None:
                out[part] = graphed.run(x[part], ids[part], steps=steps, check_every=check_every)
            else:
                out[part] = _chain(update, x[part], ids[part], part, seed=seed, rows=rows, steps=steps,
                                   check_every=check_every, observer=observer)
    return out


class _Update:
    """x_{t+1} = x_t − drift·∇G(x_t) + ε z_t in place on a leaf ``state``; returns (G(x_t), ∇G(x_t))."""

    def __init__(self, energy_fn: EnergyFn, drift: float, step_size: float, precision: str) -> None:
        self.energy_fn, self.drift, self.step_size, self.precision = energy_fn, drift, step_size, precision

    def energy_grad(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """(G(x) (N,) fp32, ∇ₓ Σ G (N, C, H, W) in the state's dtype) for a leaf that requires grad."""
        with torch.enable_grad():
            with _autocast(state.device, self.precision):
                energy = self.energy_fn(state)
            (grad,) = torch.autograd.grad(energy.float().sum(), state)
        return energy.detach().float(), grad

    def apply(self, state: Tensor, grad: Tensor, z: Tensor) -> None:
        with torch.no_grad():
            state.add_(grad, alpha=-self.drift).add_(z, alpha=self.step_size)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"`` (weight-cast cache off: CUDA graphs capture the casts)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def _start_state(x: Tensor, rows: int) -> Tensor:
    """The chain's own state buffer: ``x`` padded to ``rows`` rows, in the device's memory format, a leaf
    that requires grad (updated in place under no_grad: no per-step graph inputs to build)."""
    state = pad_rows(x.detach(), rows).clone(memory_format=memory_format_for(x.device))
    return state.requires_grad_(True)


def _chain(update: _Update, x: Tensor, ids: Tensor, part: slice, *, seed: int, rows: int, steps: int,
           check_every: int, observer: StepObserver | None) -> Tensor:
    """All ``steps`` of one micro-batch (b <= rows real rows at ``part`` of the batch, padded to ``rows``):
    (b, C, H, W) -> same."""
    real = x.shape[0]
    noise = SampleNoise(pad_rows(ids.to(x.device), rows), seed, STREAM_LANGEVIN)
    state = _start_state(x, rows)
    block = NOISE_BLOCK_STEPS.get(x.device.type, 1)
    for first in range(0, steps, block):
        z = noise.block(min(block, steps - first), tuple(x.shape[1:]), x.device, x.dtype)
        for k in range(z.shape[1]):
            energy, grad = update.energy_grad(state)  # G(x_t), ∇G(x_t) for t = first + k
            if observer is not None:
                observer(first + k, part, state.detach()[:real], energy[:real])
            update.apply(state, grad, z[:, k])
            _check(first + k + 1, steps, check_every, energy[:real], grad[:real], ids)
    if observer is not None:
        observer(steps, part, state.detach()[:real], None)
    return state.detach()[:real]


def _check(step: int, steps: int, check_every: int, energy: Tensor, grad: Tensor, ids: Tensor) -> None:
    """NaN/Inf check after update ``step`` (1-based) every ``check_every`` steps and after the last."""
    if step % check_every == 0 or step == steps:
        check_finite(energy, grad, where=f"purification Langevin step {step}", ids=ids)


class _GraphedChain:
    """One Langevin step of a ``rows``-row micro-batch captured once as a CUDA graph, replayed ``steps``
    times per micro-batch. The noise is made inside the graph from a device-side draw counter, so a replay
    needs nothing from the host; the numbers are those of ``_chain`` (same kernels, same order)."""

    WARMUP_STEPS = 3  # on a side stream before capture, as CUDA graph capture requires

    def __init__(self, update: _Update, x: Tensor, rows: int, seed: int) -> None:
        self.rows, self.device = rows, x.device
        self.state = _start_state(x[:1], rows)
        self.ids = torch.zeros(rows, dtype=torch.int64, device=x.device)
        self.draw = torch.zeros(1, dtype=torch.int64, device=x.device)
        key, shape, dtype = stream_key(seed, STREAM_LANGEVIN), tuple(self.state.shape), x.dtype

        def step() -> tuple[Tensor, Tensor]:
            energy, grad = update.energy_grad(self.state)
            z = gaussian(self.ids, key, self.draw, math.prod(shape[1:]), dtype).view(shape)
            update.apply(self.state, grad, z)
            self.draw.add_(1)
            return energy, grad

        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                step()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.energy, self.grad = step()

    def run(self, x: Tensor, ids: Tensor, *, steps: int, check_every: int) -> Tensor:
        """All ``steps`` of one micro-batch: (b, C, H, W) -> same, b <= rows."""
        real = x.shape[0]
        with torch.no_grad():
            self.state.copy_(pad_rows(x.detach(), self.rows))
            self.ids.copy_(pad_rows(ids.to(self.device), self.rows))
            self.draw.zero_()
        for step in range(1, steps + 1):
            self.graph.replay()
            _check(step, steps, check_every, self.energy[:real], self.grad[:real], ids)
        return self.state.detach()[:real].clone()


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
