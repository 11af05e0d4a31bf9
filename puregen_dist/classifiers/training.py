"""Classifier training with the paper's recipes as configurable defaults (PUREGEN_REFERENCE §7.2):
SGD(lr 0.1, momentum 0.9, wd 5e-4), batch 128, MultiStepLR (or cosine), random crop (pad 4) + horizontal flip.

Seeded and deterministic on CPU: initialisation, shuffling and augmentation draw from generators seeded by the
experiment seed, never from global state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.data.transforms import as_tensor, channel_stats, random_crop_flip, uint8_to_unit
from puregen_dist.device import resolve_device
from puregen_dist.protocols import TrainHook
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, nn.Module], Mapping[str, float]]
"""Called after each epoch with (epoch starting at 1, model in eval mode); returns metrics to record."""


class Normalized(nn.Module):
    """Wraps a classifier so it takes (N, C, H, W) images in [0, 1] and normalises them itself."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.mean = tuple(mean)
        self.std = tuple(std)
        # (channels, dtype, device) -> (mean, std) tensors, made once: copying them from the host per batch
        # would be a blocking copy on CUDA, stalling the GPU once per batch
        self._stats: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def forward(self, x_unit: Tensor) -> Tensor:
        key = (x_unit.shape[1], x_unit.dtype, x_unit.device)
        if key not in self._stats:
            with torch.inference_mode(False):  # made in an inference-mode call, autograd could not save them
                self._stats[key] = channel_stats(self.mean, self.std, *key)
        mean, std = self._stats[key]
        return self.net((x_unit - mean) / std)


@dataclass
class TrainResult:
    """What training produced: the model, one metrics dict per epoch, wall time, and the ids the last epoch
    trained on (fewer than the training set's when a training defense dropped rows)."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    trained_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def make_optimizer(model: nn.Module, cfg: ClassifierConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam over the trainable parameters, both with weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ClassifierConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule of ``cfg``: MultiStepLR(milestones, gamma) or cosine annealing to 0
    over ``cfg.epochs``."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=cfg.gamma)


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    cfg: ClassifierConfig,
    *,
    seed: int,
    hooks: Sequence[TrainHook] = (),
    on_epoch_end: EpochCallback | None = None,
    report: Callable[..., None] | None = None,
) -> TrainResult:
    """Train ``model`` (which takes [0, 1] input, e.g. :class:`Normalized`) on ``train``.

    Args:
        model: maps (N, C, H, W) float in [0, 1] to (N, K) logits; moved to ``cfg.device``.
        train: the (possibly poisoned and purified) training set.
        cfg: the recipe (epochs, optimizer, schedule, augmentation).
        seed: drives shuffling and augmentation.
        hooks: training-defense hooks (:class:`~puregen_dist.protocols.TrainHook`): at the start of each epoch
            each gets the set the epoch starts from (``train``, then what the previous hook returned) and
            returns the set to train on; each augmented batch passes through their ``on_batch``.
        on_epoch_end: per-epoch evaluation; its metrics are merged into the epoch's history entry.
        report: called as ``report(metrics, step=epoch)`` after each epoch (e.g. ``Tracker.log_metrics``).

    Returns:
        TrainResult with per-epoch ``train_loss``, ``train_acc``, ``lr``, ``epoch_seconds`` (+ callback metrics).

    Raises:
        FloatingPointError: an epoch's loss was not finite (checked at the epoch's end, not per batch: the
            loop never waits for the device).
    """
    device = resolve_device(cfg.device)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    resident = ResidentSet(device)
    result = TrainResult(model)
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        tick = time.perf_counter()
        epoch_set = train
        for hook in hooks:
            epoch_set = hook.on_epoch_start(epoch, epoch_set, model)
        lr = optimizer.param_groups[0]["lr"]
        sums = _train_epoch(model, resident.of(epoch_set), cfg, optimizer, criterion, generator, hooks)
        loss, acc = float(sums[0]) / len(epoch_set), int(sums[1]) / len(epoch_set)  # the epoch's one sync
        if not np.isfinite(loss):
            raise FloatingPointError(f"classifier training loss is {loss} in epoch {epoch} "
                                     f"(lr {cfg.lr} may be too high)")
        scheduler.step()
        stats = {"train_loss": loss, "train_acc": acc, "lr": lr, "epoch_seconds": time.perf_counter() - tick}
        if hooks:
            stats["train_rows"] = float(len(epoch_set))
        if on_epoch_end is not None:
            model.eval()
            stats.update(on_epoch_end(epoch, model))
        result.history.append(stats)
        if report is not None:
            report(stats, step=epoch)
        log.info("epoch %d/%d %s", epoch, cfg.epochs, _format(stats))
        result.trained_ids = epoch_set.ids
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@dataclass
class DeviceSet:
    """A training set resident on the training device: the ImageSet (ids for the hooks) with its images
    (N, H, W, C) uint8 and labels (N,) int64 as tensors on the device."""

    data: ImageSet
    images: Tensor
    labels: Tensor


class ResidentSet:
    """Moves a training set to the device once and keeps it while epochs train on the same set (a training
    defense that hands a new set to an epoch moves that one instead). uint8 at rest: a quarter of float32's
    memory, and the batches are converted and augmented on the device, so the CPU never feeds the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: DeviceSet | None = None

    def of(self, data: ImageSet) -> DeviceSet:
        if self.current is None or self.current.data is not data:
            self.current = DeviceSet(data, as_tensor(data.images).to(self.device),
                                     torch.from_numpy(data.labels).to(self.device))
        return self.current


def _train_epoch(
    model: nn.Module,
    train: DeviceSet,
    cfg: ClassifierConfig,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    generator: torch.Generator,
    hooks: Sequence[TrainHook] = (),
) -> tuple[Tensor, Tensor]:
    """One pass over a seeded permutation of ``train`` (each augmented batch through the hooks' ``on_batch``);
    returns 0-dim tensors on the device: the sum of per-row losses (float64; not finite when a batch's loss
    was) and the number of correct predictions (int64).

    Nothing here waits for the device: batch indices and augmentation draws come from the CPU ``generator``
    and are copied over without blocking, and the sums stay on the device (the loss in float64: the same
    numbers as a Python sum of ``loss.item()``) until the caller reads them once per epoch.
    """
    model.train()
    device = train.images.device
    order = torch.randperm(len(train.data), generator=generator).numpy()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(order), cfg.batch_size):
        index = np.sort(order[start:start + cfg.batch_size])  # sorted: contiguous-ish gathers, same batch set
        rows = torch.from_numpy(index).to(device, non_blocking=True)
        x = random_crop_flip(uint8_to_unit(train.images[rows]), cfg.crop_padding, cfg.flip, generator)
        for hook in hooks:
            x = hook.on_batch(x, torch.from_numpy(train.data.ids[index]), generator)
        if len(index) == 1 and _has_batchnorm(model):
            continue  # BatchNorm cannot train on a batch of one (skipped after its draws: seeded runs unchanged)
        y = train.labels[rows]
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(index)
        correct += (logits.argmax(1) == y).sum()
    return total_loss, correct


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _format(stats: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in stats.items())
