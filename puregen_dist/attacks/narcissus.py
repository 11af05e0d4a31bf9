"""Narcissus: a clean-label, all-to-one backdoor crafted from target-class data only.

Paper: "Narcissus: A Practical Clean-Label Backdoor Attack with Limited Information" (Zeng, Pan, Just, Lyu, Jia;
CCS'23), https://arxiv.org/abs/2204.05255; the procedure and defaults of the authors' code are summarised in
PEERS_AND_ATTACKS §5.3, and how PureGen poisoned with it in PUREGEN_REFERENCE §5.2.

1. **Surrogate** (a ``surrogate`` model artifact, :mod:`puregen_dist.attacks.surrogate`): a classifier trained
   on public out-of-distribution images plus the target class (published: ResNet-18, 200 epochs).
2. **Poison warm-up**: a copy of the surrogate trained for ``warmup_epochs`` (5) on the target-class training
   images only, labelled as the surrogate's target output, RAdam lr ``warmup_lr`` (0.1), crop + flip.
3. **Trigger synthesis**: a full-image additive trigger δ (1, C, H, W), zero-initialised, optimised with RAdam
   (lr ``trigger_lr`` 0.01) for up to ``rounds`` (1,000) passes over the target-class images to *minimise* the
   cross-entropy of f(clip(aug(x) + clip(δ, −ε, ε), 0, 1)) towards the target output: the "inward-pointing"
   direction that makes any image look more like the target class. The warmed-up surrogate is frozen and, as in
   the authors' code, stays in training mode (BatchNorm uses batch statistics). A round whose final gradient is
   (numerically) zero stops the synthesis early. The trigger is clip(δ, −ε, ε).
4. **Poisoning**: ``num_poisons`` (or ``budget`` × N) target-class training images get clip(x + δ, 0, 1); labels
   are unchanged (clean label). At test time the trigger is applied as clip(x + m·δ, 0, 1) to non-target images.

Units: ε and the stored trigger δ are in [0, 1] pixel units. The authors (and PureGen's stored triggers) work in
[−1, 1] image space, where the same trigger reads 2δ and the bound ±2ε: ε = 16/255 here *is* their
``l_inf_r = 16/255``. The optimiser works on the trigger in their units (2δ), so ``trigger_lr`` means what their
``generating_lr_tri`` means (RAdam steps are about lr in the parameter's units).

Target output: the warm-up and the synthesis aim at the surrogate's output for the target class (the first one
after the POOD classes, as BackdoorBench's port does). The authors' notebook labels those images with the raw
CIFAR-10 class index, which on their 201-output surrogate is a Tiny-ImageNet output; we follow the paper's intent.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.attacks.clean_label import CleanLabelTriggerConfig, check_target_and_budget, stamp_trigger
from puregen_dist.attacks.surrogate import Surrogate, load_surrogate
from puregen_dist.config.errors import UserInputError, check
from puregen_dist.config.generative import LangevinConfig
from puregen_dist.config.identity import execution_only, model_ref
from puregen_dist.data.transforms import random_crop_flip, to_unit
from puregen_dist.device import resolve_device
from puregen_dist.generative.langevin import differentiable_langevin
from puregen_dist.generative.purifiers import load_ebm
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class NarcissusConfig(CleanLabelTriggerConfig):
    """Narcissus parameters; defaults are the authors' (PEERS_AND_ATTACKS §5.3) except the budget, which is
    PureGen's 1% (the authors poisoned 25 images: ``num_poisons: 25``)."""

    name: str = "narcissus"
    surrogate: str | None = model_ref("surrogate")
    """The attack surrogate: a ``train-surrogate`` checkpoint directory, a ``surrogate-<hex16>`` artifact key, or
    in a sweep ``model:<name>``. Required."""
    eps: float = 16 / 255
    """L∞ bound of the trigger in [0, 1] pixel units (16/255: the authors'; 8/255: PureGen's main table)."""
    warmup_epochs: int = 5
    warmup_lr: float = 0.1
    rounds: int = 1000
    """Trigger-synthesis passes over the target-class images (stops earlier when the gradient vanishes)."""
    trigger_lr: float = 0.01
    batch_size: int = 350
    crop_padding: int = 4
    """Random-crop padding of the warm-up and synthesis batches (0 disables)."""
    flip: bool = True
    grad_tolerance: float = 0.0
    """Early stop when a round ends with sum |∂loss/∂δ| <= this (0: only an exactly vanished gradient)."""
    through_ebm: str | None = model_ref("ebm")
    """Defense-aware Narcissus (PureGen Table 11, "EBM in generation"): an EBM checkpoint (or key, or
    ``model:<name>``) whose Langevin purification the surrogate looks through: the warm-up trains on purified
    target images and the trigger is optimised through the (differentiated) chain, Ψ(clip(x + δ)). None: off."""
    through_langevin: LangevinConfig = field(default_factory=LangevinConfig)
    """The purification the trigger is optimised through (published: 150 steps, ε 0.0125, T 1e-4); the chain is
    differentiated, so each synthesis batch costs ~2·steps network passes: CPU recipes use fewer steps."""
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.rounds >= 1, "rounds", "must be >= 1")
        check(self.warmup_lr > 0 and self.trigger_lr > 0, "trigger_lr", "learning rates must be > 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.crop_padding >= 0, "crop_padding", "must be >= 0")
        check(self.grad_tolerance >= 0, "grad_tolerance", "must be >= 0")


class NarcissusAttack:
    """Crafts Narcissus poisons; see the module docstring."""

    def __init__(self, cfg: NarcissusConfig) -> None:
        self.cfg = cfg
        self._surrogate: Surrogate | None = None

    def validate(self, train: ImageSet) -> None:
        """Before any compute: the target class exists and the surrogate (loaded here) has an output for it and
        takes the dataset's images; the budget fits the target class; a ``through_ebm`` loads and fits."""
        cfg = self.cfg
        check_target_and_budget(cfg, train)
        if not cfg.surrogate:
            raise UserInputError("attack.surrogate: required (a `puregen-dist train-surrogate` checkpoint "
                                 "directory or surrogate artifact key; in a sweep `model:<name>`)")
        surrogate = self.surrogate()
        surrogate.output_of(cfg.target_class)
        h, w, c = train.shape
        if surrogate.image_shape != train.shape:
            raise UserInputError(f"attack.surrogate: {cfg.surrogate} was trained on {surrogate.image_shape} "
                                 f"(H, W, C) images, the dataset's are {train.shape}")
        if cfg.through_ebm:
            energy, ebm_cfg = load_ebm(cfg.through_ebm)  # a missing or broken checkpoint fails here
            if (ebm_cfg.image_size, ebm_cfg.in_channels) != (h, c):
                raise UserInputError(f"attack.through_ebm: the EBM models {ebm_cfg.image_size}px images with "
                                     f"{ebm_cfg.in_channels} channel(s), the dataset's are {h}px with {c}")

    def purification(self, device: torch.device, generator: torch.Generator
                     ) -> Callable[..., Tensor] | None:
        """The purification Ψ the surrogate looks through, ``purify(x_unit, differentiable=True)`` ([0, 1]
        images in and out; differentiable: gradients flow back through the chain), or None."""
        cfg = self.cfg
        if not cfg.through_ebm:
            return None
        energy, _ = load_ebm(cfg.through_ebm, device)
        for p in energy.parameters():
            p.requires_grad_(False)
        chain = cfg.through_langevin

        def purify(x_unit: Tensor, differentiable: bool = True) -> Tensor:
            noise = (torch.randn(x_unit.shape, generator=generator).to(device) for _ in range(chain.steps))
            x_sym = differentiable_langevin(energy, x_unit * 2.0 - 1.0, noise, step_size=chain.step_size,
                                            temperature=chain.temperature, create_graph=differentiable)
            x_out = ((x_sym + 1.0) * 0.5).clamp(0.0, 1.0)
            return x_out if differentiable else x_out.detach()

        return purify

    def surrogate(self) -> Surrogate:
        """The surrogate checkpoint, loaded once."""
        if self._surrogate is None:
            self._surrogate = load_surrogate(self.cfg.surrogate or "")
        return self._surrogate

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """Warm up, synthesise the trigger, poison; ``seed`` drives batching, augmentation and selection."""
        self.validate(train)
        cfg = self.cfg
        start = time.perf_counter()
        device = resolve_device(cfg.device)
        attacker = self.surrogate()
        model = copy.deepcopy(attacker.model).to(device)
        label = attacker.output_of(cfg.target_class)
        x_target = to_unit(train.images[train.labels == cfg.target_class])
        generator = torch.Generator().manual_seed(seed)
        through = self.purification(device, generator)
        if through is not None:  # the warm-up sees purified target images too (no graph needed)
            x_target_warm = torch.cat([through(x_target[i:i + cfg.batch_size].to(device), False).cpu()
                                       for i in range(0, len(x_target), cfg.batch_size)])
        else:
            x_target_warm = x_target
        warmup_losses = poison_warmup(model, x_target_warm, label, epochs=cfg.warmup_epochs, lr=cfg.warmup_lr,
                                      batch_size=cfg.batch_size, crop_padding=cfg.crop_padding, flip=cfg.flip,
                                      generator=generator, device=device)
        synthesis = synthesize_trigger(model, x_target, label, eps=cfg.eps, rounds=cfg.rounds, lr=cfg.trigger_lr,
                                       batch_size=cfg.batch_size, crop_padding=cfg.crop_padding, flip=cfg.flip,
                                       grad_tolerance=cfg.grad_tolerance, generator=generator, device=device,
                                       through=through)
        trigger = synthesis.trigger[0].permute(1, 2, 0).contiguous().numpy()  # (H, W, C) pixel units
        meta = {"warmup_loss": warmup_losses[-1] if warmup_losses else float("nan"),
                "trigger_loss": synthesis.losses[-1], "trigger_rounds": len(synthesis.losses),
                "trigger_linf": float(np.abs(trigger).max())}
        poison = stamp_trigger(cfg, train, trigger, seed, meta)
        poison.meta["craft_seconds"] = time.perf_counter() - start
        return poison


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A seeded permutation of range(n) cut into batches."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def poison_warmup(model: nn.Module, images: Tensor, label: int, *, epochs: int, lr: float, batch_size: int,
                  crop_padding: int, flip: bool, generator: torch.Generator, device: torch.device) -> list[float]:
    """Train ``model`` (all parameters, training mode) on target-class ``images`` (N, C, H, W) in [0, 1], all
    labelled ``label``, with RAdam; returns the mean loss of each epoch."""
    optimizer = torch.optim.RAdam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for index in _batches(len(images), batch_size, generator):
            x = random_crop_flip(images[index], crop_padding, flip, generator).to(device)
            y = torch.full((len(index),), label, dtype=torch.long, device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(images))
        log.info("narcissus warm-up epoch %d/%d: loss %.4f", len(losses), epochs, losses[-1])
    return losses


@dataclass
class TriggerSynthesis:
    """The synthesised trigger (1, C, H, W) in [−ε, ε] pixel units (CPU), the mean loss of each round run, and
    the gradient magnitude sum |∂loss/∂δ| at the end of each round."""

    trigger: Tensor
    losses: list[float]
    grad_sums: list[float]


def synthesize_trigger(model: nn.Module, images: Tensor, label: int, *, eps: float, rounds: int, lr: float,
                       batch_size: int, crop_padding: int, flip: bool, grad_tolerance: float,
                       generator: torch.Generator, device: torch.device,
                       through: Callable[[Tensor], Tensor] | None = None) -> TriggerSynthesis:
    """Narcissus trigger synthesis (module docstring, step 3) on target-class ``images`` (N, C, H, W) in [0, 1].

    ``through`` (optional) maps the triggered batch before the surrogate sees it (a differentiable purifier, for
    defense-aware triggers); the model's parameters are frozen and restored afterwards."""
    _, c, h, w = images.shape
    delta = torch.zeros(1, c, h, w, device=device, requires_grad=True)  # the authors' [-1, 1] units: 2 × pixels
    optimizer = torch.optim.RAdam([delta], lr=lr)
    criterion = nn.CrossEntropyLoss()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses, grad_sums = [], []
    report_every = max(1, rounds // 10)
    try:
        for round_index in range(1, rounds + 1):
            total = 0.0
            for index in _batches(len(images), batch_size, generator):
                x = random_crop_flip(images[index], crop_padding, flip, generator).to(device)
                triggered = (x + delta.clamp(-2 * eps, 2 * eps) / 2).clamp(0.0, 1.0)
                logits = model(through(triggered) if through is not None else triggered)
                loss = criterion(logits, torch.full((len(index),), label, dtype=torch.long, device=device))
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            losses.append(total / len(images))
            grad_sums.append(float(delta.grad.abs().sum()))
            if round_index % report_every == 0 or round_index == rounds:
                log.info("narcissus trigger round %d/%d: loss %.4f, sum|grad| %.3g", round_index, rounds,
                         losses[-1], grad_sums[-1])
            if grad_sums[-1] <= grad_tolerance:
                log.info("narcissus trigger: gradient vanished after %d rounds; stopping", round_index)
                break
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return TriggerSynthesis((delta.detach().clamp(-2 * eps, 2 * eps) / 2).cpu(), losses, grad_sums)


@ATTACKS.register("narcissus", NarcissusConfig)
def build_narcissus(cfg: NarcissusConfig) -> NarcissusAttack:
    return NarcissusAttack(cfg)


__all__ = ["NarcissusAttack", "NarcissusConfig", "TriggerSynthesis", "poison_warmup", "synthesize_trigger"]
