"""Bullseye Polytope: a triggerless clean-label attack on transfer learning, pure PyTorch (issue 11).

Paper: "Bullseye Polytope: A Scalable Clean-Label Poisoning Attack with Improved Transferability" (Aghakhani,
Meng, Wang, Kruegel, Vigna; EuroS&P 2021), https://arxiv.org/abs/2005.00191; the defaults of the authors' code
are summarised in PEERS_AND_ATTACKS §5.2.

k poison images x_i + δ_i of the poison class (labels unchanged) are optimised so that, in the feature space of
every substitute network φ_m of an ensemble, the *mean* of their features sits on the target's feature (the
"bullseye" of the polytope they span, with fixed equal 1/k coefficients):

    L(δ) = 1/M Σ_m ‖ (1/k) Σ_i φ_m(x_i + δ_i) − φ_m(x_t) ‖ / ‖ φ_m(x_t) ‖

φ_m is the penultimate feature (the head's input) in ``linear`` mode; in ``end2end`` mode the loss is also
averaged over the outputs of the network's blocks. The substitutes keep dropout on while crafting, on their
penultimate features at each substitute's rate, and with ``net_repeat`` R > 1 the poisons' features are averaged
over R dropout draws (BP-3x, BP-5x). Adam (lr 0.04, β 0.9/0.999) updates δ; after every step δ is projected onto
the L∞ ε ball and the pixel range. A victim that retrains its linear head (or fine-tunes) on a set holding the
poisons puts the target on the poisons' side: it predicts the poison class for the target.

Units, as in the authors' code: ε bounds [0, 1] pixel values, while Adam steps the poisons in the units of the
substitutes' normalised input ((x − mean) / std, the first substitute's std), so lr 0.04 is a step of about
0.04 × std ≈ 0.008 in pixel units on CIFAR-10.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.attacks.surrogate import load_classifier
from puregen_dist.classifiers.transfer import head_name
from puregen_dist.config.errors import UserInputError, check
from puregen_dist.config.identity import execution_only, model_refs_field
from puregen_dist.config.schema import AttackConfig
from puregen_dist.data.transforms import to_unit, unit_to_uint8
from puregen_dist.device import resolve_device
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

log = logging.getLogger(__name__)

Mode = Literal["linear", "end2end"]


@dataclass(frozen=True)
class Substitute:
    """A substitute feature extractor: ``model`` maps (N, C, H, W) [0, 1] images to logits (its ``.net`` is the
    bare network); ``dropout`` is the rate applied to its penultimate features while crafting."""

    model: nn.Module
    dropout: float = 0.0


def feature_blocks(model: nn.Module, x: Tensor, mode: Mode) -> list[Tensor]:
    """Features of ``x`` (N, C, H, W) in ``model``: ``[penultimate (N, D)]`` in linear mode; in end2end mode the
    flattened outputs (N, D_b) of each top-level block of the network that yields a feature map, then the
    penultimate features (blocks: top-level children with parameters, so pooling layers are skipped). Captured
    with forward hooks, so any registered architecture works."""
    net = getattr(model, "net", model)
    head = dict(net.named_modules())[head_name(net)]
    captured: list[Tensor] = []
    hooks = [head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))]
    blocks: list[Tensor] = []
    if mode == "end2end":
        for child in net.children():
            if child is not head and any(True for _ in child.parameters()):  # a block, not a pool or activation
                hooks.append(child.register_forward_hook(
                    lambda _m, _a, out: blocks.append(out.flatten(1)) if out.dim() == 4 else None))
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return blocks + captured


def bullseye_loss(poison_features: Sequence[Tensor], target_features: Sequence[Tensor]) -> Tensor:
    """Mean over blocks of ‖mean_i p_i − t‖ / ‖t‖ for poison features (k, D_b) and target features (1, D_b)."""
    ratios = [(p.mean(0) - t[0]).norm() / t[0].norm().clamp_min(1e-12)
              for p, t in zip(poison_features, target_features, strict=True)]
    return torch.stack(ratios).mean()


def _poison_features(sub: Substitute, x: Tensor, mode: Mode, net_repeat: int) -> list[Tensor]:
    """The substitute's feature blocks of ``x``, the penultimate one through dropout averaged over
    ``net_repeat`` draws (only the penultimate features carry dropout, as in the authors' networks)."""
    blocks = feature_blocks(sub.model, x, mode)
    if sub.dropout <= 0:
        return blocks
    draws = [nn.functional.dropout(blocks[-1], sub.dropout, training=True) for _ in range(net_repeat)]
    return blocks[:-1] + [torch.stack(draws).mean(0)]


def ensemble_loss(substitutes: Sequence[Substitute], poisons: Tensor, targets: Sequence[list[Tensor]],
                  mode: Mode, net_repeat: int) -> Tensor:
    """The Bullseye objective averaged over the ensemble (module docstring)."""
    losses = [bullseye_loss(_poison_features(sub, poisons, mode, net_repeat), target)
              for sub, target in zip(substitutes, targets, strict=True)]
    return torch.stack(losses).mean()


@dataclass
class Polytope:
    """Crafted poisons (k, C, H, W) in [0, 1] within ε of their bases, the loss of every iteration, and the
    ensemble's mean-feature distance ratio before and after (the loss without dropout)."""

    poisons: Tensor
    losses: list[float]
    distance_before: float
    distance_after: float


def craft_polytope(substitutes: Sequence[Substitute], bases: Tensor, target: Tensor, *, eps: float,
                   iterations: int = 4000, lr: float = 0.04, mode: Mode = "linear", net_repeat: int = 1,
                   device: torch.device | str = "cpu",
                   progress: Callable[[int, float], None] | None = None) -> Polytope:
    """Bullseye Polytope poisons from ``bases`` (k, C, H, W) [0, 1] for ``target`` (1, C, H, W) [0, 1].

    The substitutes are put in eval mode (batch-norm statistics frozen, parameters never updated); dropout is
    drawn from the global torch generator (seed it for reproducible crafting). ``progress(iteration, loss)`` is
    called every tenth of the iterations."""
    for sub in substitutes:
        sub.model.to(device).eval().requires_grad_(False)
    bases, target = bases.to(device), target.to(device)
    with torch.no_grad():
        target_features = [feature_blocks(sub.model, target, mode) for sub in substitutes]
        distance_before = float(_distance(substitutes, bases, target_features, mode))
    std = _input_std(substitutes[0].model, bases.shape[1]).to(device)
    scaled = (bases / std).requires_grad_(True)  # optimised in the normalised input's units, as the authors
    optimizer = torch.optim.Adam([scaled], lr=lr, betas=(0.9, 0.999))
    losses, report_every = [], max(1, iterations // 10)
    for iteration in range(1, iterations + 1):
        loss = ensemble_loss(substitutes, scaled * std, target_features, mode, net_repeat)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            projected = torch.min(torch.max(scaled * std, bases - eps), bases + eps).clamp(0.0, 1.0)
            scaled.copy_(projected / std)
        losses.append(loss.item())
        if progress is not None and (iteration % report_every == 0 or iteration == iterations):
            progress(iteration, losses[-1])
    poisons = (scaled * std).detach()
    with torch.no_grad():
        distance_after = float(_distance(substitutes, poisons, target_features, mode))
    return Polytope(poisons.cpu(), losses, distance_before, distance_after)


def _input_std(model: nn.Module, channels: int) -> Tensor:
    """(1, C, 1, 1) per-channel normalisation std of ``model``'s input (1 when it does not normalise)."""
    std = torch.as_tensor(getattr(model, "std", (1.0,)), dtype=torch.float32)
    return std.expand(channels).reshape(1, channels, 1, 1).clone()


def _distance(substitutes: Sequence[Substitute], x: Tensor, target_features: Sequence[list[Tensor]],
              mode: Mode) -> Tensor:
    """The ensemble objective without dropout (the distance ratio reported before and after crafting)."""
    return ensemble_loss([Substitute(sub.model) for sub in substitutes], x, target_features, mode, net_repeat=1)


# ------------------------------------------------------------------------------------------ the attack


@dataclass(frozen=True, kw_only=True)
class BullseyeConfig(AttackConfig):
    """Bullseye Polytope parameters; defaults are the authors' linear-transfer ones (PEERS_AND_ATTACKS §5.2):
    ε 0.1, 5 poisons, Adam lr 0.04, 4,000 iterations, frog (6) → ship (8). The PureGen linear-transfer setting:
    ``num_poisons: 50, iterations: 800``; fine-tune: ``num_poisons: 5, iterations: 1500, net_repeat: 3,
    mode: end2end``; the Toxic-benchmark preset: ``eps: 0.0314, iterations: 1200``."""

    name: str = "bullseye_polytope"
    substitutes: tuple[str, ...] = model_refs_field("classifier")
    """The substitute ensemble: clean classifiers trained on a source split disjoint from the victim's transfer
    set (``train-classifier`` directories, ``classifier-<hex16>`` keys, or ``model:<name>`` in a sweep)."""
    dropout: tuple[float, ...] = (0.0,)
    """Dropout rate on each substitute's penultimate features while crafting: one per substitute, or one for all
    (the authors train each architecture at 0.2, 0.25 and 0.3 and craft with the same rate)."""
    net_repeat: int = 1
    """Dropout draws the poisons' features are averaged over (BP: 1; BP-3x: 3; BP-5x: 5)."""
    mode: Mode = "linear"
    """``linear``: penultimate features (linear transfer); ``end2end``: every block's output too (fine-tuning)."""
    target_class: int = 6
    """The class of the target test image (CIFAR-10 frog)."""
    poison_class: int = 8
    """The class of the poisoned training images, and the label the target should get (CIFAR-10 ship)."""
    poison_key: int = 0
    """Draws the trial: the target test image of ``target_class`` and the poisoned images of ``poison_class``."""
    num_poisons: int = 5
    eps: float = 0.1
    """L∞ bound in [0, 1] pixel units (the authors': 0.1; Toxic: 8/255)."""
    iterations: int = 4000
    lr: float = 0.04
    device: str = execution_only("auto")

    def __post_init__(self) -> None:
        check(0.0 < self.eps <= 1.0, "eps", "must lie in (0, 1] (pixel units; 0.1 as the authors, 8/255 = 0.0314)")
        check(self.num_poisons >= 1, "num_poisons", "must be >= 1")
        check(self.iterations >= 1, "iterations", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.net_repeat >= 1, "net_repeat", "must be >= 1")
        check(self.poison_key >= 0, "poison_key", "must be >= 0")
        check(self.target_class >= 0 and self.poison_class >= 0 and self.target_class != self.poison_class,
              "poison_class", "target_class and poison_class must be two different classes (>= 0)")
        check(all(0.0 <= p < 1.0 for p in self.dropout) and len(self.dropout) >= 1, "dropout",
              "every rate must lie in [0, 1)")
        check(len(self.dropout) in (1, len(self.substitutes)) or not self.substitutes, "dropout",
              f"give one rate, or one per substitute ({len(self.substitutes)})")


@dataclass(frozen=True)
class BullseyeTrial:
    """What a poison key draws: the target's test-set position and the training positions of the bases."""

    target_row: int
    poison_rows: np.ndarray


class BullseyeAttack:
    """Crafts Bullseye Polytope poisons for one trial; see the module docstring."""

    def __init__(self, cfg: BullseyeConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet, test: ImageSet | None) -> None:
        """Before any compute: substitutes given and loadable on the dataset's images; both classes exist with
        enough images."""
        cfg = self.cfg
        if not cfg.substitutes:
            raise UserInputError("attack.substitutes: required (a list of clean classifiers: `puregen-dist "
                                 "train-classifier` directories or classifier artifact keys; `model:<name>` in a "
                                 "sweep)")
        for i, ref in enumerate(cfg.substitutes):
            _, shape = load_classifier(ref)
            if shape != train.shape:
                raise UserInputError(f"attack.substitutes[{i}]: {ref} was trained on {shape} (H, W, C) images, the "
                                     f"dataset's are {train.shape}")
        for key in ("target_class", "poison_class"):
            if getattr(cfg, key) >= train.num_classes:
                raise UserInputError(f"attack.{key}: {getattr(cfg, key)} is not a class of the dataset "
                                     f"(expected 0..{train.num_classes - 1})")
        available = int(np.sum(train.labels == cfg.poison_class))
        if cfg.num_poisons > available:
            raise UserInputError(f"attack.num_poisons: asks for {cfg.num_poisons} poisons but class "
                                 f"{cfg.poison_class} has only {available} training images")
        if test is not None and not np.any(test.labels == cfg.target_class):
            raise UserInputError(f"attack.target_class: the test split has no image of class {cfg.target_class}")

    def draw_trial(self, train: ImageSet, test: ImageSet) -> BullseyeTrial:
        """The trial of ``poison_key``: a uniformly drawn test image of the target class and ``num_poisons``
        training images of the poison class (sorted positions)."""
        rng = np.random.default_rng([self.cfg.poison_key, 0xB5])
        target_row = int(rng.choice(np.flatnonzero(test.labels == self.cfg.target_class)))
        candidates = np.flatnonzero(train.labels == self.cfg.poison_class)
        return BullseyeTrial(target_row, np.sort(rng.choice(candidates, size=self.cfg.num_poisons, replace=False)))

    def load_substitutes(self, device: torch.device | str) -> list[Substitute]:
        """The substitutes in eval mode on ``device``, each with its crafting dropout rate."""
        refs, rates = self.cfg.substitutes, self.cfg.dropout
        rates = rates * len(refs) if len(rates) == 1 else rates
        return [Substitute(load_classifier(ref, device)[0], rate) for ref, rate in zip(refs, rates, strict=True)]

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """Draw the trial, craft the polytope on the substitutes (``seed`` drives the dropout draws)."""
        if test is None:
            raise UserInputError("attack: bullseye_polytope needs the clean test split to draw its target from")
        self.validate(train, test)
        cfg, start = self.cfg, time.perf_counter()
        device = resolve_device(cfg.device)
        trial = self.draw_trial(train, test)
        bases = to_unit(train.images[trial.poison_rows])
        target = to_unit(test.images[[trial.target_row]])

        def report(iteration: int, loss: float) -> None:
            log.info("bullseye polytope iteration %d/%d: feature distance ratio %.4f", iteration, cfg.iterations,
                     loss)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            polytope = craft_polytope(self.load_substitutes(device), bases, target, eps=cfg.eps,
                                      iterations=cfg.iterations, lr=cfg.lr, mode=cfg.mode,
                                      net_repeat=cfg.net_repeat, device=device, progress=report)
        spec = TargetSpec("triggerless", target_ids=test.ids[[trial.target_row]],
                          target_labels=test.labels[[trial.target_row]].copy(), adversarial_label=cfg.poison_class)
        meta = {"craft_seconds": time.perf_counter() - start, "num_poisons": cfg.num_poisons,
                "distance_before": polytope.distance_before, "distance_after": polytope.distance_after}
        return PoisonSet(train, train.ids[trial.poison_rows], unit_to_uint8(polytope.poisons),
                         train.labels[trial.poison_rows].copy(), spec, cfg.eps, meta)


@ATTACKS.register("bullseye_polytope", BullseyeConfig)
def build_bullseye(cfg: BullseyeConfig) -> BullseyeAttack:
    return BullseyeAttack(cfg)


__all__ = ["BullseyeAttack", "BullseyeConfig", "BullseyeTrial", "Polytope", "Substitute", "bullseye_loss",
           "craft_polytope", "ensemble_loss", "feature_blocks"]
