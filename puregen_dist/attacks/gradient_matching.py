"""Gradient Matching ("Witches' Brew"): the crafting core, pure PyTorch (issue 11, first part).

Paper: "Witches' Brew: Industrial Scale Data Poisoning via Gradient Matching" (Geiping, Fowl, Huang, Czaja,
Taylor, Goldstein; ICLR 2021), https://arxiv.org/abs/2009.02276; the defaults of the authors' code are summarised
in PEERS_AND_ATTACKS §5.1.

Poisons x_i + δ_i of the adversarial class (labels unchanged) are optimised so that the training gradient they
produce on a clean surrogate f_θ points the way the *adversarial* gradient of the target does:

    L(δ) = 1 − cos( ∇_θ Σ_i ℓ(f_θ(aug(x_i + δ_i)), y_i) ,  ∇_θ ℓ(f_θ(x_t), y_adv) )

(the negative cosine similarity of the two parameter gradients, shifted to be ≥ 0). δ is drawn Gaussian and
projected, then updated with *signed* Adam (Adam on sign(∂L/∂δ)) at step τ = 0.1 × (poison batch / 512) with the
step decayed ×0.1 at 3/8, 5/8 and 7/8 of the iterations (250), and after every step projected onto the ε ball
(ε = 16/255) and the pixel range. Several restarts (8) run from fresh draws; the one with the lowest final loss is
kept. Differentiable augmentation (random translation and flip) is applied to the poisons while crafting.

Wiring this core into an attack (target and adversarial class drawn from a poison key, the test image as target,
`settings.trials`) is the next part of issue 11.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

AUGMENT_SHIFT = 4
"""Largest random translation (pixels) of the differentiable crafting augmentation (the authors' default
``--paugment`` crops by up to 4 pixels on CIFAR-10, and flips)."""


def parameter_gradient(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool) -> list[Tensor]:
    """∇_θ of the mean cross-entropy of ``model`` on (x, y), one tensor per trainable parameter (a graph is kept
    when ``create_graph``, so the gradient can itself be differentiated with respect to ``x``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def alignment_loss(poison_grad: Sequence[Tensor], target_grad: Sequence[Tensor]) -> Tensor:
    """1 − cos(poison_grad, target_grad) over all parameters (a scalar in [0, 2]; 0 = perfectly aligned)."""
    dot = sum((p * t).sum() for p, t in zip(poison_grad, target_grad, strict=True))
    poison_norm = torch.sqrt(sum(p.pow(2).sum() for p in poison_grad))
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target_grad))
    return 1.0 - dot / (poison_norm * target_norm).clamp_min(1e-12)


def differentiable_augment(x: Tensor, generator: torch.Generator, shift: int = AUGMENT_SHIFT) -> Tensor:
    """A random translation by up to ``shift`` pixels (zero fill, one draw per image) and a random horizontal flip
    of (N, C, H, W) ``x``, differentiable with respect to ``x`` (gradients flow back to the shifted pixels)."""
    n, _, h, w = x.shape
    if shift > 0:
        padded = nn.functional.pad(x, (shift,) * 4)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def step_schedule(iterations: int) -> list[int]:
    """The iterations at which the step is multiplied by 0.1: 3/8, 5/8 and 7/8 of ``iterations``."""
    return [iterations * k // 8 for k in (3, 5, 7)]


@dataclass
class Brew:
    """A crafted perturbation (P, C, H, W) within [−ε, ε] (x + δ within [0, 1]), the loss of every iteration of
    the kept restart, the final loss of every restart, and which restart was kept."""

    delta: Tensor
    losses: list[float]
    restart_losses: list[float]
    kept: int


def brew_poisons(model: nn.Module, poisons: Tensor, poison_labels: Tensor, targets: Tensor,
                 adversarial_labels: Tensor, *, eps: float, iterations: int = 250, restarts: int = 8,
                 step: float = 0.1, batch_size: int = 512, augment: bool = True,
                 generator: torch.Generator, device: torch.device | str = "cpu",
                 progress: Callable[[int, int, float], None] | None = None) -> Brew:
    """Gradient Matching on ``model`` (its parameters are only differentiated, never updated; eval mode).

    Args:
        model: the clean surrogate, (N, C, H, W) [0, 1] images -> logits.
        poisons: (P, C, H, W) base images in [0, 1] (of the adversarial class); poison_labels (P,) their labels.
        targets: (T, C, H, W) target images in [0, 1]; adversarial_labels (T,) the labels they should get.
        eps: L∞ bound in pixel units; iterations, restarts, step (τ), batch_size (poison batch): see the module
        docstring; the step is scaled by (poison batch / 512) as the authors do.
        augment: differentiable augmentation of the poisons while crafting.
        generator: drives the initial draws, batching and augmentation (crafting is seeded).
        progress: called as ``progress(restart, iteration, loss)`` every tenth of the iterations.
    """
    model = model.to(device).eval()
    target_grad = parameter_gradient(model, targets.to(device), adversarial_labels.to(device), create_graph=False)
    target_grad = [g.detach() for g in target_grad]
    scaled_step = step * min(batch_size, len(poisons)) / 512
    best: Brew | None = None
    restart_losses: list[float] = []
    for restart in range(restarts):
        delta, losses = _one_restart(model, poisons, poison_labels, target_grad, eps=eps, iterations=iterations,
                                     step=scaled_step, batch_size=batch_size, augment=augment,
                                     generator=generator, device=device, restart=restart, progress=progress)
        restart_losses.append(losses[-1])
        if best is None or losses[-1] < best.losses[-1]:
            best = Brew(delta, losses, [], restart)
    assert best is not None
    best.restart_losses = restart_losses
    return best


def _one_restart(model: nn.Module, poisons: Tensor, labels: Tensor, target_grad: list[Tensor], *, eps: float,
                 iterations: int, step: float, batch_size: int, augment: bool, generator: torch.Generator,
                 device: torch.device | str, restart: int,
                 progress: Callable[[int, int, float], None] | None) -> tuple[Tensor, list[float]]:
    """One restart: a Gaussian draw projected to the constraints, then signed-Adam steps (module docstring)."""
    init = torch.randn(poisons.shape, generator=generator) * eps
    delta = _project(init.clamp(-eps, eps), poisons, eps).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=step)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, step_schedule(iterations), gamma=0.1)
    losses = []
    report_every = max(1, iterations // 10)
    for iteration in range(1, iterations + 1):
        total = 0.0
        for index in torch.randperm(len(poisons), generator=generator).split(batch_size):
            x = poisons[index].to(device) + delta[index.to(device)]
            if augment:
                x = differentiable_augment(x, generator)
            grad = parameter_gradient(model, x, labels[index].to(device), create_graph=True)
            loss = alignment_loss(grad, target_grad)
            (delta_grad,) = torch.autograd.grad(loss, delta)  # only δ: the surrogate's parameters stay untouched
            delta.grad = delta_grad.sign()  # signed Adam
            optimizer.step()
            with torch.no_grad():
                delta.copy_(_project(delta, poisons.to(device), eps))
            total += loss.item() * len(index)
        scheduler.step()
        losses.append(total / len(poisons))
        if progress is not None and (iteration % report_every == 0 or iteration == iterations):
            progress(restart, iteration, losses[-1])
    return delta.detach().cpu(), losses


def _project(delta: Tensor, poisons: Tensor, eps: float) -> Tensor:
    """``delta`` clipped to the ε ball and so that poisons + delta stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (poisons.to(delta.device) + delta).clamp(0.0, 1.0) - poisons.to(delta.device)


__all__ = ["AUGMENT_SHIFT", "Brew", "alignment_loss", "brew_poisons", "differentiable_augment",
           "parameter_gradient", "step_schedule"]
