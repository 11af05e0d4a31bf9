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

The attack (``name: gradient_matching``): a target test image and an adversarial class (≠ its label) are drawn
from ``poison_key`` (one trial per key, as the authors' ``--poisonkey``), and the poisons are ``num_poisons`` (or
``budget`` × N) training images of that class ("single-class" threat model), labels unchanged. Success of a trial:
the victim classifies the target as the adversarial class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.attacks.surrogate import load_classifier
from puregen_dist.config.errors import UserInputError, check, check_budget, check_eps
from puregen_dist.config.identity import execution_only, model_ref, model_refs_field
from puregen_dist.config.schema import AttackConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.device import resolve_device
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

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


def brew_poisons(model: nn.Module | Sequence[nn.Module], poisons: Tensor, poison_labels: Tensor, targets: Tensor,
                 adversarial_labels: Tensor, *, eps: float, iterations: int = 250, restarts: int = 8,
                 step: float = 0.1, batch_size: int = 512, augment: bool = True, augment_shift: int = AUGMENT_SHIFT,
                 generator: torch.Generator, device: torch.device | str = "cpu",
                 progress: Callable[[int, int, float], None] | None = None) -> Brew:
    """Gradient Matching on ``model`` (its parameters are only differentiated, never updated; eval mode).

    Args:
        model: the clean surrogate, (N, C, H, W) [0, 1] images -> logits; or an ensemble of surrogates, whose
            alignment losses are averaged (the authors' ``--ensemble``; the step is divided by the ensemble size).
        poisons: (P, C, H, W) base images in [0, 1] (of the adversarial class); poison_labels (P,) their labels.
        targets: (T, C, H, W) target images in [0, 1]; adversarial_labels (T,) the labels they should get.
        eps: L∞ bound in pixel units; iterations, restarts, step (τ), batch_size (poison batch): see the module
        docstring; the step is scaled by (poison batch / 512) as the authors do.
        augment: differentiable augmentation of the poisons while crafting, translating by up to
            ``augment_shift`` pixels.
        generator: drives the initial draws, batching and augmentation (crafting is seeded).
        progress: called as ``progress(restart, iteration, loss)`` every tenth of the iterations.
    """
    models = [m.to(device).eval() for m in ([model] if isinstance(model, nn.Module) else model)]
    target_grads = [[g.detach() for g in parameter_gradient(m, targets.to(device), adversarial_labels.to(device),
                                                             create_graph=False)] for m in models]
    scaled_step = step * min(batch_size, len(poisons)) / 512 / len(models)
    best: Brew | None = None
    restart_losses: list[float] = []
    for restart in range(restarts):
        delta, losses = _one_restart(models, poisons, poison_labels, target_grads, eps=eps, iterations=iterations,
                                     step=scaled_step, batch_size=batch_size, augment=augment, shift=augment_shift,
                                     generator=generator, device=device, restart=restart, progress=progress)
        restart_losses.append(losses[-1])
        if best is None or losses[-1] < best.losses[-1]:
            best = Brew(delta, losses, [], restart)
    assert best is not None
    best.restart_losses = restart_losses
    return best


def _one_restart(models: list[nn.Module], poisons: Tensor, labels: Tensor, target_grads: list[list[Tensor]], *,
                 eps: float, iterations: int, step: float, batch_size: int, augment: bool, shift: int, generator: torch.Generator,
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
                x = differentiable_augment(x, generator, shift)
            y = labels[index].to(device)
            loss = sum(alignment_loss(parameter_gradient(m, x, y, create_graph=True), g)
                       for m, g in zip(models, target_grads, strict=True)) / len(models)
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


# ------------------------------------------------------------------------------------------ the attack


@dataclass(frozen=True, kw_only=True)
class GradientMatchingConfig(AttackConfig):
    """Gradient Matching parameters; defaults are the authors' (PEERS_AND_ATTACKS §5.1). The Toxic-benchmark
    preset: ``eps: 0.0314`` (8/255), ``num_poisons: 500``."""

    name: str = "gradient_matching"
    surrogate: str | None = model_ref("classifier")
    """A clean classifier trained on the victim's training data (``train-classifier`` directory, a
    ``classifier-<hex16>`` key, or ``model:<name>`` in a sweep). Required."""
    ensemble: tuple[str, ...] = model_refs_field("classifier", key_neutral=True)
    """More clean classifiers brewed on together with ``surrogate`` (the authors' ``--ensemble``: the alignment
    losses are averaged and the step divided by the ensemble size); empty: ``surrogate`` alone."""
    poison_key: int = 0
    """Draws the trial: the target test image, its adversarial class and the poisoned images (one trial per key)."""
    eps: float = 16 / 255
    budget: float = 0.01
    num_poisons: int | None = None
    iterations: int = 250
    restarts: int = 8
    step: float = 0.1
    """τ of signed Adam, scaled by (poison batch / 512); ×0.1 at 3/8, 5/8, 7/8 of the iterations."""
    batch_size: int = 512
    """Poison batch per gradient (the authors': 512; 128 on ImageNet)."""
    augment: bool = True
    augment_shift: int = AUGMENT_SHIFT
    """Largest random translation (pixels) of the crafting augmentation: 4 as the authors on CIFAR-10; match the
    victim's random-crop padding on smaller images (1 on 16×16 digits)."""
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check_eps(self.eps, 16)
        check(self.augment_shift >= 0, "augment_shift", "must be >= 0 pixels")
        check_budget(self.budget)
        check(self.num_poisons is None or self.num_poisons >= 1, "num_poisons", "must be >= 1 (or null)")
        check(self.poison_key >= 0, "poison_key", "must be >= 0")
        check(self.iterations >= 1 and self.restarts >= 1, "iterations", "iterations and restarts must be >= 1")
        check(self.step > 0, "step", "must be > 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class Trial:
    """What a poison key draws: the target's test-set position, its adversarial label, and the positions of the
    training images to poison (all of the adversarial class)."""

    target_row: int
    adversarial_label: int
    poison_rows: np.ndarray


class GradientMatchingAttack:
    """Crafts Gradient Matching poisons for one trial; see the module docstring."""

    def __init__(self, cfg: GradientMatchingConfig) -> None:
        self.cfg = cfg

    def num_poisons(self, train: ImageSet) -> int:
        return self.cfg.num_poisons or max(1, int(round(self.cfg.budget * len(train))))

    def validate(self, train: ImageSet) -> None:
        """Before any compute: the surrogate loads and takes the dataset's images; every class has enough
        training images for the budget (the adversarial class is drawn later)."""
        cfg = self.cfg
        if not cfg.surrogate:
            raise UserInputError("attack.surrogate: required (a clean classifier: `puregen-dist "
                                 "train-classifier` directory or classifier artifact key; `model:<name>` in a sweep)")
        for key, ref in [("surrogate", cfg.surrogate), *((f"ensemble[{i}]", r) for i, r in enumerate(cfg.ensemble))]:
            _, shape = load_classifier(ref)
            if shape != train.shape:
                raise UserInputError(f"attack.{key}: {ref} was trained on {shape} (H, W, C) images, the "
                                     f"dataset's are {train.shape}")
        fewest = int(np.bincount(train.labels, minlength=train.num_classes).min())
        if self.num_poisons(train) > fewest:
            raise UserInputError(f"attack.{'num_poisons' if cfg.num_poisons else 'budget'}: asks for "
                                 f"{self.num_poisons(train)} poisons of one class but a class has only {fewest} "
                                 "training images")

    def draw_trial(self, train: ImageSet, test: ImageSet) -> Trial:
        """The trial of ``poison_key``: a uniformly drawn test image, a different class as its adversarial label,
        and ``num_poisons`` training images of that class (sorted positions)."""
        rng = np.random.default_rng([self.cfg.poison_key, 0x6D])
        target_row = int(rng.integers(len(test)))
        others = [c for c in range(train.num_classes) if c != int(test.labels[target_row])]
        adversarial = int(rng.choice(others))
        candidates = np.flatnonzero(train.labels == adversarial)
        rows = np.sort(rng.choice(candidates, size=self.num_poisons(train), replace=False))
        return Trial(target_row, adversarial, rows)

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """Draw the trial, brew the poisons on the surrogate (``seed`` drives the brew), stamp them."""
        if test is None:
            raise UserInputError("attack: gradient_matching needs the clean test split to draw its target from")
        self.validate(train)
        cfg, start = self.cfg, time.perf_counter()
        device = resolve_device(cfg.device)
        models = [load_classifier(ref, device)[0] for ref in (cfg.surrogate or "", *cfg.ensemble)]
        trial = self.draw_trial(train, test)
        poisons = to_unit(train.images[trial.poison_rows])
        target = to_unit(test.images[[trial.target_row]])
        labels = torch.from_numpy(train.labels[trial.poison_rows])

        def report(restart: int, iteration: int, loss: float) -> None:
            log.info("gradient matching restart %d/%d iteration %d/%d: 1 - cos %.4f", restart + 1, cfg.restarts,
                     iteration, cfg.iterations, loss)

        brew = brew_poisons(models, poisons, labels, target, torch.tensor([trial.adversarial_label]), eps=cfg.eps,
                            iterations=cfg.iterations, restarts=cfg.restarts, step=cfg.step,
                            batch_size=cfg.batch_size, augment=cfg.augment, augment_shift=cfg.augment_shift,
                            generator=torch.Generator().manual_seed(seed), device=device, progress=report)
        poisoned = unit_to_uint8(poisons + brew.delta)
        spec = TargetSpec("triggerless", target_ids=test.ids[[trial.target_row]],
                          target_labels=test.labels[[trial.target_row]].copy(),
                          adversarial_label=trial.adversarial_label)
        meta = {"craft_seconds": time.perf_counter() - start, "num_poisons": int(len(trial.poison_rows)),
                "alignment_loss": brew.losses[-1], "restart_kept": brew.kept}
        return PoisonSet(train, train.ids[trial.poison_rows], poisoned, train.labels[trial.poison_rows].copy(),
                         spec, cfg.eps, meta)


@ATTACKS.register("gradient_matching", GradientMatchingConfig)
def build_gradient_matching(cfg: GradientMatchingConfig) -> GradientMatchingAttack:
    return GradientMatchingAttack(cfg)


__all__ = ["AUGMENT_SHIFT", "Brew", "GradientMatchingAttack", "GradientMatchingConfig", "Trial", "alignment_loss",
           "brew_poisons", "differentiable_augment", "parameter_gradient", "step_schedule"]
