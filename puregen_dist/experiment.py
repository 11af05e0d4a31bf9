"""The one orchestrator: load data -> craft poison -> apply defense -> train -> evaluate -> log.

Two phases, so that bad input never leaves anything behind: :func:`prepare_experiment` loads the data and
validates everything that depends on it (no output written), and :func:`execute` does the compute and logging.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from puregen_dist import __version__
from puregen_dist.attacks import build_attack
from puregen_dist.classifiers import CLASSIFIERS, build_classifier
from puregen_dist.classifiers.evaluation import (
    NAT_ACC_DEFINITION,
    POISON_SUCCESS_DEFINITION,
    PoisonSuccess,
    TargetOutcome,
    natural_accuracy,
    poison_success,
    target_outcome,
)
from puregen_dist.classifiers.training import Normalized, train_classifier
from puregen_dist.classifiers.transfer import add_feature_dropout, transfer_model
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import ClassifierJob, SurrogateJob
from puregen_dist.config.loading import flatten, to_yaml
from puregen_dist.config.schema import ExperimentConfig
from puregen_dist.data.datasets import dataset_stats, load_data
from puregen_dist.data.transforms import image_grid, trigger_image
from puregen_dist.defenses import build_defense
from puregen_dist.defenses.training_time import removal_metrics
from puregen_dist.protocols import Tracker, TrainHook, TrainingDefense
from puregen_dist.registry import UnknownNameError
from puregen_dist.tracking.names import Metric, Tag, definition_tag, success_key
from puregen_dist.types import ImageSet, TargetSpec

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated experiment with its data loaded; nothing has been written yet."""

    cfg: ExperimentConfig
    train: ImageSet
    test: ImageSet
    attack: Any
    defense: Any


@dataclass
class RunMetrics:
    """Final results of one experiment."""

    nat_acc: float
    poison_success: dict[float, PoisonSuccess] = field(default_factory=dict)
    target: TargetOutcome | None = None
    """Triggerless attacks: whether the target was classified as the adversarial (and as its true) label."""
    history: list[dict[str, float]] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    """The trained classifier (eval mode, on [0, 1] images); not logged."""

    def as_dict(self) -> dict[str, float]:
        """Flat final metrics, as logged."""
        out = {Metric.NAT_ACC: self.nat_acc, **self.costs}
        for m, ps in self.poison_success.items():
            out[success_key(m)] = ps.rate
            out.update({f"{success_key(m)}_src{c}": r for c, r in ps.per_source_class.items()})
        if self.target is not None:
            out[Metric.TARGET_SUCCESS] = self.target.success
            out[Metric.TARGET_CORRECT] = self.target.correct
        return out


def prepare_experiment(cfg: ExperimentConfig) -> Prepared:
    """Load the data and check every data-dependent setting; raises UserInputError before any compute."""
    try:
        CLASSIFIERS.get(cfg.classifier.name)
    except UnknownNameError as exc:
        raise UserInputError(f"classifier.name: {exc}") from None
    train, test = load_data(cfg.data)
    attack = build_attack(cfg.attack)
    attack.validate(train)
    defense = build_defense(cfg.defense)  # loads generative checkpoints: a bad one fails here
    defense.validate(train)
    if cfg.classifier.transfer != "scratch":
        build_model(cfg, train)  # a missing or mismatched pretrained classifier fails here
    return Prepared(cfg, train, test, attack, defense)


def execute(prep: Prepared, tracker: Tracker) -> RunMetrics:
    """Craft, defend, train and evaluate; log params, per-epoch and final metrics, and the config."""
    cfg = prep.cfg
    log_setup(cfg, tracker)
    poison, craft_seconds = _timed(lambda: prep.attack.craft(prep.train, seed=cfg.seed, test=prep.test))
    poisoned = poison.materialize()
    log.info("attack %s: %d poisoned of %d training images", cfg.attack.name, len(poison.poison_ids), len(poisoned))
    defended, defense_seconds = _timed(lambda: prep.defense.apply(poisoned, seed=cfg.seed))
    _check_defense_output(poisoned, defended, cfg.defense)
    log.info("defense %s: %.2fs", cfg.defense.name, defense_seconds)
    log_samples(tracker, poison.poison_ids, poisoned, defended, poison.target)
    costs = {"craft_seconds": craft_seconds, "defense_seconds": defense_seconds,
             "defense_seconds_per_image": defense_seconds / max(len(poisoned), 1),
             "num_poisons": float(len(poison.poison_ids))}
    return train_and_evaluate(cfg, defended, prep.test, poison.target, tracker, costs=costs,
                              hooks=training_hooks(prep.defense, cfg.seed),
                              removal=(poisoned.ids, poison.poison_ids))


def train_and_evaluate(cfg: ExperimentConfig, train: ImageSet, test: ImageSet, target: TargetSpec,
                       tracker: Tracker, *, costs: dict[str, float] | None = None,
                       report: Callable[[dict[str, float], int], None] | None = None,
                       hooks: Sequence[TrainHook] = (),
                       removal: tuple[np.ndarray, np.ndarray] | None = None) -> RunMetrics:
    """Train ``cfg.classifier`` on the (defended) training set and evaluate it on the clean test set.

    Per epoch: test accuracy, and poison success at m = 1 for triggered attacks, to the tracker (and to
    ``report(metrics, epoch)`` when given, e.g. Ray Tune). Final: natural accuracy, poison success at every
    ``cfg.eval.magnifications``, ``costs`` plus ``train_seconds`` and the training defense's ``hooks``'
    summaries, logged at step ``epochs``. ``removal`` = (ids of the poisoned set before the defense, poison
    ids): for a defense that removes rows (a filter before training, or EPIC during it), how well it removed
    the poisons (:func:`~puregen_dist.defenses.training_time.removal_metrics`).
    """
    model = build_model(cfg, train)
    triggered = target.kind == "triggered"

    def on_epoch_end(epoch: int, net: nn.Module) -> dict[str, float]:
        metrics = {"test_acc": natural_accuracy(net, test, cfg.classifier.eval_batch_size)}
        if triggered:
            ps = poison_success(net, test, target, 1.0, cfg.classifier.eval_batch_size)
            metrics[success_key(1.0)] = ps.rate
        return metrics

    def log_epoch(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(metrics, step=step)
        if report is not None:
            report(metrics, step)

    result = train_classifier(model, train, cfg.classifier, seed=cfg.seed, hooks=hooks,
                              on_epoch_end=on_epoch_end, report=log_epoch)
    costs = with_hook_summaries({**(costs or {}), "train_seconds": result.seconds}, hooks, len(train))
    if removal is not None and cfg.defense.removes_rows:
        costs.update(removal_metrics(removal[0], result.trained_ids, removal[1]))
    metrics = RunMetrics(
        nat_acc=natural_accuracy(result.model, test, cfg.classifier.eval_batch_size),
        history=result.history, costs=costs,
        run_id=getattr(tracker, "run_id", None), model=result.model.eval(),
    )
    if triggered:
        metrics.poison_success = {m: poison_success(result.model, test, target, m, cfg.classifier.eval_batch_size)
                                  for m in cfg.eval.magnifications}
    if target.kind == "triggerless":
        metrics.target = target_outcome(result.model, test, target, cfg.classifier.eval_batch_size)
        tracker.log_params({"target.adversarial_label": target.adversarial_label,
                            "target.true_labels": ",".join(map(str, np.atleast_1d(target.target_labels)))
                            if target.target_labels is not None else "",
                            "target.ids": ",".join(map(str, np.atleast_1d(target.target_ids)))
                            if target.target_ids is not None else ""})
    tracker.log_metrics(metrics.as_dict(), step=cfg.classifier.epochs)
    return metrics


def run_experiment(cfg: ExperimentConfig, tracker: Tracker) -> RunMetrics:
    """prepare + execute, for callers that have already validated their input."""
    return execute(prepare_experiment(cfg), tracker)


def summary_line(cfg: ExperimentConfig, metrics: RunMetrics) -> str:
    """One line: what ran and its headline numbers."""
    parts = [f"{cfg.name}: attack={cfg.attack.name} defense={cfg.defense.name} classifier={cfg.classifier.name}",
             f"nat_acc={metrics.nat_acc:.4f}"]
    parts += [f"{success_key(m)}={ps.rate:.4f}" for m, ps in metrics.poison_success.items()]
    if metrics.target is not None:
        parts.append(f"{Metric.TARGET_SUCCESS}={metrics.target.success:.0f} {Metric.TARGET_CORRECT}="
                     f"{metrics.target.correct:.0f}")
    if metrics.run_id:
        parts.append(f"run_id={metrics.run_id}")
    return " ".join(parts)


# --- steps --------------------------------------------------------------------------------------------------


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def log_setup(cfg: ExperimentConfig, tracker: Tracker) -> None:
    tracker.log_params(flatten(cfg))
    tracker.set_tags({
        "puregen_dist.version": __version__,
        definition_tag(Metric.NAT_ACC): NAT_ACC_DEFINITION,
        definition_tag(Metric.POISON_SUCCESS): POISON_SUCCESS_DEFINITION,
        "attack": cfg.attack.name, "defense": cfg.defense.name, Tag.CLASSIFIER: cfg.classifier.name,
        "dataset": cfg.data.dataset,
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(to_yaml(cfg))
        tracker.log_artifact(path)


def build_model(cfg: ExperimentConfig | ClassifierJob | SurrogateJob, train: ImageSet) -> nn.Module:
    """The classifier of ``cfg.classifier`` for ``train``'s shape and classes, initialised from ``cfg.seed``
    (for transfer: the pretrained backbone and a fresh head), wrapped to normalise [0, 1] input with
    ``cfg.data``'s statistics (``.net`` is the bare network)."""
    h, _, c = train.shape
    mean, std = dataset_stats(cfg.data, c)
    clf = cfg.classifier
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_classifier(clf.name, in_channels=c, num_classes=train.num_classes, image_size=h)
        net = transfer_model(net, clf.transfer, clf.pretrained or "", name=clf.name, in_channels=c)
        if clf.dropout > 0:
            add_feature_dropout(net, clf.dropout)
    return Normalized(net, clf.mean or mean, clf.std or std)


def with_hook_summaries(costs: dict[str, float], hooks: Sequence[TrainHook], rows: int) -> dict[str, float]:
    """``costs`` plus each hook's summary; a hook's ``defense_seconds`` adds to the defense's time before
    training, and ``defense_seconds_per_image`` follows (over ``rows`` training images)."""
    for hook in hooks:
        for name, value in hook.summary().items():
            costs[name] = costs.get(name, 0.0) + value if name == "defense_seconds" else value
    if hooks and "defense_seconds" in costs:
        costs["defense_seconds_per_image"] = costs["defense_seconds"] / max(rows, 1)
    return costs


def training_hooks(defense: Any, seed: int) -> Sequence[TrainHook]:
    """The training loop's hooks of a built defense: a TrainingDefense's (FRIENDS, EPIC), none otherwise."""
    return defense.hooks(seed=seed) if isinstance(defense, TrainingDefense) else ()


def _check_defense_output(before: ImageSet, after: ImageSet, cfg: Any) -> None:
    """A DataDefense must keep ids, labels, order, shape and dtype; a filter (``removes_rows``) may drop rows,
    keeping the others' order, ids, labels and images."""
    kept = np.flatnonzero(np.isin(before.ids, after.ids)) if cfg.removes_rows else np.arange(len(before))
    same = (after.images.shape == (len(kept), *before.shape) and after.images.dtype == np.uint8
            and np.array_equal(after.ids, before.ids[kept]) and np.array_equal(after.labels, before.labels[kept]))
    if not same:
        raise RuntimeError(f"defense {cfg.name!r} changed ids, labels, order, shape or dtype of the training set")


def log_samples(tracker: Tracker, poison_ids: np.ndarray, poisoned: ImageSet, defended: ImageSet,
                target: TargetSpec | None = None) -> None:
    """Grids of up to 16 training images (poisoned ones first) before and after the defense, and the attack's
    additive trigger (scaled to be visible; not for a patch or an α-blend, whose pattern is an image)."""
    if target is not None and target.trigger is not None and target.trigger_mask is None:
        tracker.log_image(trigger_image(target.trigger), "trigger")
    ids = poison_ids[:16] if len(poison_ids) else poisoned.ids[:16]
    tracker.log_image(image_grid(poisoned.images[poisoned.positions(ids)]), "train_before_defense")
    kept = ids[np.isin(ids, defended.ids)]  # a filter may have removed some
    if len(kept):
        tracker.log_image(image_grid(defended.images[defended.positions(kept)]), "train_after_defense")
