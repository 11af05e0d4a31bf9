"""Langevin dynamics on an energy G_θ, the readable reference (PUREGEN_REFERENCE §1.2.6, §1.3).

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627.

One step (the paper's x ← x − Δτ ∇G̃ + √(2Δτ) z with G̃ = G/T and Δτ = ε²/2):

    x ← x − (ε² / 2) ∇ₓ (G(x) / T) + ε z,    z ~ N(0, I)

with ε = 1.25e-2, T = 1e-4 by default (drift 0.78125 on ∇G, per-step noise std 0.0125 in [-1, 1] space).
Gradients are taken with respect to the input only; no clipping inside the chain.

This module is the algorithm as written: :func:`langevin_step` and the plain chain :func:`langevin_chain` (EBM
training's negative chains and short-run samples use them). Purification runs the same update through
:func:`puregen_dist.generative.langevin_fast.langevin_purify`, which only changes how the numbers are computed
(micro-batches, pool-folded network, block noise), with a per-step :class:`StepObserver` for diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

EnergyFn = Callable[[Tensor], Tensor]
"""(B, C, H, W) -> (B,) energies."""

NoiseFn = Callable[[Tensor], Tensor]
"""The current state x (B, C, H, W) -> the step's standard normal z, same shape, dtype and device."""


class LangevinStep(NamedTuple):
    """One update's results: the new state and what the update used at the old one."""

    x: Tensor
    """(B, C, H, W) x_{k+1}."""
    energy: Tensor
    """(B,) G(x_k), detached."""
    grad: Tensor
    """(B, C, H, W) ∇ₓ(G/T) at x_k."""


class StepObserver(Protocol):
    """Sees a Langevin chain state by state, as it runs (e.g. ℓ2 trajectories, energy traces).

    Called with t = 0, 1, …, steps for each group of rows the chain runs together; within a group t
    increases. ``x`` is the unclamped state x_t (b, C, H, W) after t updates, a view of the chain's own
    buffer: read it (or copy it) before returning, never modify it. ``energy`` is G(x_t) (b,) when the
    chain has it anyway (t < steps: it is the energy whose gradient makes the next update); at t = steps it
    is None (no extra network evaluation is made for an observer). Nothing is synchronised or copied to the
    host for the observer; whatever it computes is its own cost.
    """

    def __call__(self, step: int, rows: slice, x: Tensor, energy: Tensor | None) -> None:
        """Observe x_t of the rows ``rows``.

        Args:
            step: t, the number of updates applied to ``x``.
            rows: the positions of these rows in the batch passed to the chain.
            x: (b, C, H, W) x_t, [-1, 1] space, not clamped.
            energy: (b,) G(x_t), or None at the last step.
        """


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
                  noise: Tensor) -> LangevinStep:
    """One Langevin update.

    Args:
        energy_fn: G_θ, (B, C, H, W) -> (B,).
        x: (B, C, H, W) current state, [-1, 1] space (not clipped).
        step_size: ε > 0.
        temperature: T > 0.
        noise: (B, C, H, W) standard normal z.

    Returns:
        (x_next, energies G(x) at the current state (B,), gradient ∇ₓ(G/T) (B, C, H, W)), a
        :class:`LangevinStep`.
    """
    # 1. G(x) and ∇ₓ G(x), per sample
    energy, grad = energy_and_grad(energy_fn, x)
    # 2. ∇ₓ(G/T)
    grad = grad / temperature
    # 3. x ← x − (ε²/2) ∇ₓ(G/T) + ε z
    x_next = x.detach() - (0.5 * step_size * step_size) * grad + step_size * noise
    return LangevinStep(x_next, energy, grad)


def langevin_chain(energy_fn: EnergyFn, x: Tensor, noise: NoiseFn, *, steps: int, step_size: float,
                   temperature: float) -> Iterator[LangevinStep]:
    """``steps`` successive :func:`langevin_step` updates from ``x``: the chain as written.

    Step k (0-based) draws z = ``noise(x_k)`` and yields ``langevin_step``'s (x_{k+1}, G(x_k) (B,),
    ∇ₓ(G/T)(x_k) (B, C, H, W)). Nothing is yielded for ``steps = 0``.

    Args:
        energy_fn: G_θ, (B, C, H, W) -> (B,).
        x: (B, C, H, W) x_0, [-1, 1] space.
        noise: draws each step's z; called once per step, before the step, in step order.
        steps, step_size, temperature: the chain (§1.2.6).
    """
    for _ in range(steps):
        update = langevin_step(energy_fn, x, step_size, temperature, noise(x))
        yield update
        x = update.x


def differentiable_langevin(energy_fn: EnergyFn, x: Tensor, noise: Iterable[Tensor], *, step_size: float,
                            temperature: float, create_graph: bool = True) -> Tensor:
    """The chain of :func:`langevin_step` with gradients *through* it: x_K as a differentiable function of x_0
    (second derivatives of G, ``create_graph``), for defense-aware attacks that optimise an input through
    purification. The network's parameters get no gradient from here (callers freeze them).

    Args:
        energy_fn: G_θ, (B, C, H, W) -> (B,).
        x: (B, C, H, W) x_0 in [-1, 1] space, part of the caller's graph.
        noise: the steps' standard normals z_0..z_{K-1}, each (B, C, H, W) (K = the number of steps; a
            generator keeps only one in memory).
        step_size, temperature: ε and T (§1.2.6).
        create_graph: False runs the same chain without building the graph through it (no gradient to x_0).

    Returns:
        (B, C, H, W) x_K, unclamped.
    """
    drift = 0.5 * step_size * step_size / temperature
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        for z in noise:
            if not create_graph:
                x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy_fn(x).sum(), x, create_graph=create_graph)
            x = x - drift * grad + step_size * z
    return x if create_graph else x.detach()


def check_finite(energy: Tensor, grad: Tensor, *, where: str, ids: Tensor | None = None) -> None:
    """Raise FloatingPointError naming ``where`` and the offending sample ids if energies (B,) or gradients
    (B, ...) are NaN/Inf (synchronises an accelerator)."""
    bad = ~torch.isfinite(energy) | ~torch.isfinite(grad.flatten(1)).all(dim=1)
    if bool(bad.any()):
        which = (ids[bad.cpu()] if ids is not None else torch.nonzero(bad).flatten()).tolist()[:10]
        label = "sample ids" if ids is not None else "batch rows"
        raise FloatingPointError(f"non-finite EBM energy or gradient at {where} ({label} {which}); "
                                 "lower the temperature ratio / step size or check the checkpoint")
