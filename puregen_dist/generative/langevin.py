"""Langevin dynamics on an energy G_θ (PUREGEN_REFERENCE §1.2.6, §1.3), pure functions.

One step (the paper's x ← x − Δτ ∇G̃ + √(2Δτ) z with G̃ = G/T and Δτ = ε²/2):

    x ← x − (ε² / 2) ∇ₓ (G(x) / T) + ε z,    z ~ N(0, I)

with ε = 1.25e-2, T = 1e-4 by default (drift 0.78125 on ∇G, per-step noise std 0.0125 in [-1, 1] space).
Gradients are taken with respect to the input only; no clipping inside the chain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

EnergyFn = Callable[[Tensor], Tensor]
"""(B, C, H, W) -> (B,) energies."""


def energy_and_grad(energy_fn: EnergyFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """(G(x), ∇ₓ Σ_b G(x_b)): energies (B,) and the per-sample input gradient (B, C, H, W).

    The energy nets have no batch-coupled layers, so the gradient of the batch sum is each sample's own gradient.
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
    """Raise FloatingPointError naming ``where`` and the offending sample ids if energies/gradients are NaN/Inf."""
    bad = ~torch.isfinite(energy) | ~torch.isfinite(grad.flatten(1)).all(dim=1)
    if bool(bad.any()):
        which = (ids[bad.cpu()] if ids is not None else torch.nonzero(bad).flatten()).tolist()[:10]
        label = "sample ids" if ids is not None else "batch rows"
        raise FloatingPointError(f"non-finite EBM energy or gradient at {where} ({label} {which}); "
                                 "lower the temperature ratio / step size or check the checkpoint")
