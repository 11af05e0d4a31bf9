"""Orchestration of the model commands (``train-ebm``, ``train-ddpm``, ``train-classifier``, ``purify``): load and check
the inputs first (nothing written), then compute with an injected tracker. Importing this module registers the
built-in model kinds' trainers in :data:`puregen_dist.registry.MODELS`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from puregen_dist.attacks import build_attack
from puregen_dist.attacks.surrogate import surrogate_training_set
from puregen_dist.classifiers.evaluation import natural_accuracy
from puregen_dist.classifiers.training import train_classifier
from puregen_dist.classifiers.transfer import save_trained_classifier
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import ClassifierJob, DDPMJob, EBMJob, ModelJob, PurifyJob, SurrogateJob
from puregen_dist.config.loading import flatten
from puregen_dist.data.datasets import load_data
from puregen_dist.data.io import read_imageset, write_imageset
from puregen_dist.defenses import build_defense
from puregen_dist.experiment import build_model
from puregen_dist.generative.train_ddpm import train_ddpm
from puregen_dist.generative.train_ebm import train_ebm
from puregen_dist.protocols import Tracker
from puregen_dist.registry import MODELS
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)


Data = tuple[ImageSet, ImageSet]
"""(train, test) splits of a job's ``data`` section."""


def training_data(job: ModelJob) -> Data:
    """(train, test) of a model job: ``data``'s splits, or, with ``train_on`` (a poison-set directory; artifact
    keys are resolved by the caller), that poison set's images and labels as the training split. Raises
    UserInputError naming the key when the poison set's images do not match ``data``'s shape (labels out of
    ``data``'s class range are refused when it is read), or, for a surrogate, when its POOD set does not fit."""
    train, test = load_data(job.data)
    if isinstance(job, SurrogateJob):  # the POOD mix is checked here, before the caller writes anything
        surrogate_training_set(train, load_data(job.pood)[0], job.target_classes, job.pood_drop_classes)
    if not job.train_on:
        return train, test
    source = Path(job.train_on)
    if not source.is_dir():
        raise UserInputError(f"train_on: {job.train_on}: not a poison-set directory (or, with a store, a "
                             "poison-<hex16> artifact key)")
    poisoned, flags = read_imageset(source, classes=train.classes)
    if poisoned.shape != train.shape:
        raise UserInputError(f"train_on: {job.train_on}: images are {poisoned.shape} (H, W, C), data's are "
                             f"{train.shape}")
    log.info("training on poison set %s: %d images, %d poisoned", source.name, len(poisoned), int(flags.sum()))
    return poisoned, test


@MODELS.register(EBMJob.model_kind, EBMJob)
def train_ebm_job(job: EBMJob, tracker: Tracker, data: Data | None = None) -> Path:
    """Train the EBM of ``job`` on its data's training split; returns the checkpoint directory."""
    train, _ = data if data is not None else training_data(job)
    tracker.log_params(flatten(job))
    return train_ebm(job, train, tracker)


@MODELS.register(DDPMJob.model_kind, DDPMJob)
def train_ddpm_job(job: DDPMJob, tracker: Tracker, data: Data | None = None) -> Path:
    """Train the DDPM of ``job``; its test split feeds the per-epoch purification samples."""
    train, test = data if data is not None else training_data(job)
    tracker.log_params(flatten(job))
    return train_ddpm(job, train, test, tracker)


@MODELS.register(ClassifierJob.model_kind, ClassifierJob)
def train_classifier_job(job: ClassifierJob, tracker: Tracker, data: Data | None = None) -> Path:
    """Pretrain ``job.classifier`` from scratch on clean ``job.data`` (per-epoch test accuracy) and save the
    bare network as a classifier checkpoint in ``job.output``; returns the directory."""
    train, test = data if data is not None else training_data(job)
    tracker.log_params(flatten(job))
    return _train_and_save_classifier(job, train, test, tracker, meta={})


def _train_and_save_classifier(job: ClassifierJob | SurrogateJob, train: ImageSet, test: ImageSet,
                               tracker: Tracker, meta: dict[str, object]) -> Path:
    """Train ``job.classifier`` from scratch on ``train`` (per-epoch accuracy on ``test``) and save the bare
    network as a classifier checkpoint in ``job.output`` with ``meta`` (plus accuracy, epochs, and the input
    normalisation the network was trained with)."""
    clf = job.classifier
    model = build_model(job, train)
    result = train_classifier(model, train, clf, seed=job.seed, report=tracker.log_metrics,
                              on_epoch_end=lambda epoch, m: {"test_acc": natural_accuracy(m, test,
                                                                                          clf.eval_batch_size)})
    accuracy = natural_accuracy(model, test, clf.eval_batch_size)
    tracker.log_metrics({"nat_acc": accuracy, "train_seconds": result.seconds}, step=clf.epochs)
    return save_trained_classifier(job.output, model, name=clf.name, epochs=clf.epochs, shape=train.shape,
                                   num_classes=train.num_classes, nat_acc=accuracy, meta=meta)


@MODELS.register(SurrogateJob.model_kind, SurrogateJob)
def train_surrogate_job(job: SurrogateJob, tracker: Tracker, data: Data | None = None) -> Path:
    """Train the attack surrogate of ``job`` (POOD + the victim's target classes, see :class:`SurrogateJob`);
    per-epoch accuracy on the same mix of test images; saved as a classifier checkpoint whose meta says which
    output is which target class. Returns the directory."""
    victim_train, victim_test = data if data is not None else training_data(job)
    pood_train, pood_test = load_data(job.pood)
    train = surrogate_training_set(victim_train, pood_train, job.target_classes, job.pood_drop_classes)
    test = surrogate_training_set(victim_test, pood_test, job.target_classes, job.pood_drop_classes)
    tracker.log_params(flatten(job))
    pood_classes = train.num_classes - len(job.target_classes)
    log.info("surrogate: %d POOD images (%d classes) + %d target-class images", int((train.labels < pood_classes)
             .sum()), pood_classes, int((train.labels >= pood_classes).sum()))
    return _train_and_save_classifier(job, train, test, tracker,
                                      meta={"pood_classes": pood_classes, "target_classes": list(job.target_classes)})


@dataclass
class PurifyResult:
    """Where the purified set went and how fast it was made."""

    path: Path
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class PreparedPurify:
    """A validated purify job: data loaded, attack and defense built (checkpoints loaded)."""

    job: PurifyJob
    train: ImageSet
    attack: object
    defense: object
    test: ImageSet | None = None


def prepare_purify(job: PurifyJob) -> PreparedPurify:
    """Load data, build and validate attack and defense; raises UserInputError before any compute."""
    train, test = load_data(job.data)
    attack = build_attack(job.attack)
    attack.validate(train)
    defense = build_defense(job.defense)
    defense.validate(train)
    return PreparedPurify(job, train, attack, defense, test)


def purify_job(prep: PreparedPurify, tracker: Tracker) -> PurifyResult:
    """Poison (if configured), purify in-process, and write the Parquet image set atomically."""
    job = prep.job
    poison = prep.attack.craft(prep.train, seed=job.seed, test=prep.test)
    poisoned = poison.materialize()
    start = time.perf_counter()
    purified = prep.defense.apply(poisoned, seed=job.seed)
    seconds = time.perf_counter() - start
    kept_poisons = poison.poison_ids[np.isin(poison.poison_ids, purified.ids)]  # a filter removes rows
    path = write_imageset(purified, job.output, poisoned_ids=kept_poisons)
    result = PurifyResult(path, len(purified), seconds)
    tracker.log_params(flatten(job))
    tracker.log_metrics({"purify_seconds": seconds, "images_per_second": result.images_per_second,
                         "seconds_per_image": seconds / max(len(purified), 1)})
    return result
