"""Floors: what a classifier trained on *clean* data does with an attack's test inputs, next to what the attacked
one does (issue 12: "each figure shown next to the rate at which a model trained on clean data sends the same
triggered images to the target class").

A triggered attack's poison success counts non-target-class test images that, with the trigger added, are
classified as the target class. Some of that happens without any poisoning: a trigger at ε 16/255 is itself an
adversarial perturbation of a clean model (Narcissus optimises it on a surrogate), and a clean model has a base
rate of confusions. The floor measures it: the same metric, on the same triggered images, for the classifier the
sweep trained on the clean training set with the same defense, classifier and seed (the cell of attack
``none`` in the same row). For triggerless attacks the floor is whether that clean classifier already sends the
target image to the adversarial label.

How: the trial of an attack-``none`` cell stores its trained classifier in the artifact store (a classifier
checkpoint keyed by its training set, classifier config, data and seed); after the trials, the sweep driver
evaluates it on each attacked cell's stored target and adds ``floor_poison_success_m<m>`` /
``floor_target_success`` to that cell's MLflow run. Cells whose row has no attack-``none`` cell get no floor.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from puregen_dist.config.loading import key_dict
from puregen_dist.config.schema import ExperimentConfig, NoAttackConfig
from puregen_dist.pipeline.store import ArtifactStore, artifact_key
from puregen_dist.sweep.plan import TrialPlan
from puregen_dist.sweep.spec import cell_id_of
from puregen_dist.tracking.names import Metric, success_key

log = logging.getLogger(__name__)

CLEAN_MODEL_KIND = "classifier"
"""Store kind of a clean cell's trained classifier: an ordinary classifier checkpoint (usable wherever a
``classifier-<hex16>`` key is, e.g. as a Gradient Matching surrogate)."""


def clean_model_key(cfg: ExperimentConfig, train_key: str) -> tuple[str, dict[str, Any]]:
    """(key, keyed config) of the classifier a trial of ``cfg`` trains on the training set ``train_key``."""
    config = {"trained_on": train_key, "data": key_dict(cfg.data), "classifier": key_dict(cfg.classifier),
              "seed": cfg.seed}
    return artifact_key(CLEAN_MODEL_KIND, config, inputs=[train_key]), config


def store_clean_model(store: ArtifactStore, cfg: ExperimentConfig, train_key: str, model: Any,
                      shape: tuple[int, int, int], num_classes: int, nat_acc: float) -> str:
    """Commit the classifier an attack-``none`` trial trained (``model``: a ``Normalized`` network on [0, 1]
    images of ``shape`` (H, W, C)) as a classifier checkpoint, once per key; returns the key."""
    from puregen_dist.classifiers.transfer import save_trained_classifier

    key, config = clean_model_key(cfg, train_key)
    if store.reusable(key):  # a corrupt one is moved aside and committed again
        return key
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_trained_classifier(f"{tmp}/model", model, name=cfg.classifier.name,
                                            epochs=cfg.classifier.epochs, shape=shape, num_classes=num_classes,
                                            nat_acc=nat_acc)
        store.put_dir(key, directory, kind=CLEAN_MODEL_KIND, config=config, inputs=[train_key])
    return key


def clean_cell_id(cfg: ExperimentConfig) -> str:
    """The cell id of ``cfg`` with its attack replaced by ``none`` (same defense, classifier, data, seed)."""
    return cell_id_of(dataclasses.replace(cfg, attack=NoAttackConfig()))


def floor_metrics(model: Any, cfg: ExperimentConfig, test: Any, target: Any) -> dict[str, float]:
    """The floor metrics of one attacked cell: ``model`` (the clean classifier) on ``target``'s test inputs
    at every ``cfg.eval.magnifications`` (triggered), or on its target image (triggerless)."""
    from puregen_dist.classifiers.evaluation import poison_success, target_outcome

    batch = cfg.classifier.eval_batch_size
    if target.kind == "triggered":
        return {Metric.FLOOR_PREFIX + success_key(m): poison_success(model, test, target, m, batch).rate
                for m in cfg.eval.magnifications}
    if target.kind == "triggerless":
        return {Metric.FLOOR_TARGET_SUCCESS: target_outcome(model, test, target, batch).success}
    return {}


def log_floors(trials: Iterable[TrialPlan], store: ArtifactStore, tracking_uri: str,
               runs: Mapping[str, tuple[str, set[str]]]) -> int:
    """Add the floor metrics to each finished attacked cell's run that lacks them and whose row has a stored
    clean classifier. ``runs``: cell id -> (run id, metric names it has). Returns the number of runs updated."""
    from puregen_dist.attacks.surrogate import load_classifier
    from puregen_dist.data.datasets import load_data
    from puregen_dist.pipeline.stages import read_target
    from puregen_dist.tracking.mlflow_tracker import log_metrics_to_run

    trials = list(trials)
    clean = {t.cell.cell_id: t for t in trials if t.cell.config.attack.name == NoAttackConfig.name}
    models: dict[str, Any] = {}
    tests: dict[str, Any] = {}
    updated = 0
    for trial in trials:
        cfg = trial.cell.config
        reference = clean.get(clean_cell_id(cfg))
        if reference is None or trial.cell.cell_id not in runs or reference is trial:
            continue
        run_id, logged = runs[trial.cell.cell_id]
        if any(name.startswith(Metric.FLOOR_PREFIX) for name in logged):
            continue
        key, _ = clean_model_key(reference.cell.config, reference.train_key)
        if not store.reusable(key):
            continue
        if key not in models:
            models[key] = load_classifier(store.get_dir(key))[0]
        data_key = artifact_key("data", key_dict(cfg.data))
        if data_key not in tests:
            tests[data_key] = load_data(cfg.data)[1]
        metrics = floor_metrics(models[key], cfg, tests[data_key], read_target(store, trial.poison_key))
        if metrics:
            log_metrics_to_run(tracking_uri, run_id, metrics, step=cfg.classifier.epochs)
            updated += 1
    if updated:
        log.info("logged the clean-model floor of %d attacked cells", updated)
    return updated


def cell_runs(tracking_uri: str, experiment: str) -> dict[str, tuple[str, set[str]]]:
    """Cell id -> (run id, names of its metrics) of the latest finished child run of each cell."""
    import pandas as pd

    from puregen_dist.sweep.report import latest_per_cell
    from puregen_dist.tracking.names import Tag, tag_column
    from puregen_dist.tracking.reader import read_runs

    runs = latest_per_cell(read_runs(tracking_uri, experiment))
    metrics = [c for c in runs.columns if c.startswith("metrics.")]
    return {row[tag_column(Tag.CELL_ID)]: (row["run_id"], {c.removeprefix("metrics.") for c in metrics
                                                           if pd.notna(row[c])})
            for _, row in runs.iterrows()}
