"""One sweep trial: read the cell's training set and poison target from the artifact store, train and
evaluate the classifier, log one MLflow child run (DESIGN §2: trials only read artifacts, never run Ray Data).

:func:`run_trial` is the Ray Tune function trainable; :func:`execute_trial` is the same work without Tune
(what it calls, and what unit tests call).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from puregen_dist.classifiers.evaluation import NAT_ACC_DEFINITION, POISON_SUCCESS_DEFINITION
from puregen_dist.config.loading import build, to_dict
from puregen_dist.config.schema import ExperimentConfig, NoAttackConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.experiment import RunMetrics, log_samples, log_setup, train_and_evaluate, training_hooks
from puregen_dist.pipeline.models import resolve_models
from puregen_dist.pipeline.stages import read_target
from puregen_dist.pipeline.store import ArtifactStore
from puregen_dist.plugins import load_plugins
from puregen_dist.protocols import Tracker, TrainHook
from puregen_dist.sweep.floors import store_clean_model
from puregen_dist.sweep.plan import TrialPlan
from puregen_dist.tracking.names import AttackKind, Metric, Tag, definition_tag
from puregen_dist.tracking.reader import finished_cells, iter_runs  # finished_cells: resume's view of MLflow

log = logging.getLogger(__name__)

FINISHED = "FINISHED"
LOST = "KILLED"
"""The status given to a run whose attempt died without ending it (see :func:`close_lost_attempts`)."""
_CELL_ID = re.compile(r"[A-Za-z0-9_.-]+")


def trial_spec(trial: TrialPlan, *, sweep: str, store_uri: str, tracking_uri: str,
               parent_run_id: str | None) -> dict[str, Any]:
    """The JSON-able description of one trial that Tune hands to :func:`run_trial` as ``config["trial"]``."""
    cell = trial.cell
    return {"sweep": sweep, "cell_id": cell.cell_id, "index": cell.index, "row": cell.row, "col": cell.col,
            "config": to_dict(cell.config), "poison_key": trial.poison_key, "train_key": trial.train_key,
            "artifact_tags": trial.tags(), "store": store_uri, "tracking_uri": tracking_uri,
            "parent_run_id": parent_run_id}


def cell_tags(spec: Mapping[str, Any], cfg: ExperimentConfig, attack_kind: str) -> dict[str, str]:
    """Tags of a child run: what the report groups by, the metric definitions, the artifact keys."""
    tags = {Tag.SWEEP: spec["sweep"], Tag.CELL_ID: spec["cell_id"], Tag.CELL_INDEX: str(spec["index"]),
            Tag.ROW: spec["row"], Tag.COL: spec["col"], Tag.ATTACK_KIND: attack_kind, Tag.SEED: str(cfg.seed),
            Tag.CLASSIFIER: cfg.classifier.name, definition_tag(Metric.NAT_ACC): NAT_ACC_DEFINITION,
            definition_tag(Metric.POISON_SUCCESS): POISON_SUCCESS_DEFINITION, **spec["artifact_tags"]}
    target = getattr(cfg.attack, "target_class", None)
    if attack_kind == AttackKind.TRIGGERED and target is not None:
        tags[Tag.TARGET_CLASS] = str(target)
    return tags


def execute_trial(spec: Mapping[str, Any], tracker: Tracker,
                  report: Callable[[dict[str, float], int], None] | None = None) -> RunMetrics:
    """Train and evaluate the classifier of ``spec`` on its stored training set (purified, or the poison set
    for ``defense: none``); poison success uses the target stored with the poison set. Costs come from the
    artifact manifests (crafting and purification time)."""
    cfg = build(ExperimentConfig, spec["config"], source=f"cell {spec['cell_id']}")
    store = ArtifactStore(spec["store"])
    cfg = resolve_trial_models(cfg, store)
    poison_key, train_key = spec["poison_key"], spec["train_key"]
    target = read_target(store, poison_key)
    log_setup(cfg, tracker)
    tracker.set_tags(cell_tags(spec, cfg, target.kind if cfg.attack.name != "none" else "none"))
    poisoned, flags = store.get_imageset(poison_key)
    train = poisoned if train_key == poison_key else store.get_imageset(train_key)[0]
    _, test = load_data(cfg.data)
    log_samples(tracker, poisoned.ids[flags], poisoned, train, target)
    metrics = train_and_evaluate(cfg, train, test, target, tracker, report=report,
                                 costs=_costs(store, poison_key, train_key, len(poisoned), int(flags.sum())),
                                 hooks=trial_hooks(cfg), removal=(poisoned.ids, poisoned.ids[flags]))
    if cfg.attack.name == NoAttackConfig.name:  # the clean classifier of this row: the floor of attacked cells
        store_clean_model(store, cfg, train_key, metrics.model, train.shape, train.num_classes, metrics.nat_acc)
    return metrics


def trial_hooks(cfg: ExperimentConfig) -> Sequence[TrainHook]:
    """The training loop's hooks of a defense that acts during training (``pipeline: none``; FRIENDS, EPIC).
    A data defense's work is in the stored training set already: it is not built here."""
    if cfg.defense.pipeline != "none":
        return ()
    from puregen_dist.defenses import build_defense

    return training_hooks(build_defense(cfg.defense), cfg.seed)


def resolve_trial_models(cfg: ExperimentConfig, store: ArtifactStore) -> ExperimentConfig:
    """``cfg`` with the model artifact keys the trial itself loads replaced by local directories: the
    classifier's (a pretrained network) and, for a defense with no purified set (one that acts during
    training), the defense's. Purified sets were made before the trial: their models are not fetched."""
    sections = {"classifier": resolve_models(cfg.classifier, store, "classifier")}
    if cfg.defense.pipeline == "none":
        sections["defense"] = resolve_models(cfg.defense, store, "defense")
    return dataclasses.replace(cfg, **sections)


def _costs(store: ArtifactStore, poison_key: str, train_key: str, images: int, poisons: int) -> dict[str, float]:
    craft = store.manifest(poison_key).get("timings", {})
    costs = {"craft_seconds": float(craft.get("craft_s", craft.get("build_s", 0.0))),
             "num_poisons": float(poisons)}
    if train_key != poison_key:
        purify = store.manifest(train_key).get("timings", {})
        seconds = float(purify.get("purify_s", purify.get("build_s", 0.0)))
        costs.update({"defense_seconds": seconds, "defense_seconds_per_image": seconds / max(images, 1)})
        if "seconds_per_image_per_device" in purify:
            costs["defense_seconds_per_image_per_device"] = float(purify["seconds_per_image_per_device"])
    return costs


def node_tags() -> dict[str, str]:
    """Where this trial runs: the Ray node's id and address (tags ``ray_node_id``, ``ray_node_ip``)."""
    import ray

    return {"ray_node_id": ray.get_runtime_context().get_node_id(),
            "ray_node_ip": ray.util.get_node_ip_address()}


def close_lost_attempts(tracking_uri: str, experiment_id: str, cell_id: str, current_run_id: str) -> list[str]:
    """End as KILLED the runs of ``cell_id`` still RUNNING that started before ``current_run_id``: attempts whose
    process died (a SIGKILLed or OOM-killed worker, a lost node, a killed driver) before they could end their run,
    now superseded by this attempt. A sweep runs one trial per cell, and Tune retries it only after the previous
    attempt died, so no live attempt is touched. Each gets the tags ``error`` and ``superseded_by``; returns their
    run ids."""
    from mlflow.tracking import MlflowClient

    if not _CELL_ID.fullmatch(cell_id):
        return []
    client = MlflowClient(tracking_uri)
    start = client.get_run(current_run_id).info.start_time
    query = f"attributes.status = 'RUNNING' AND tags.`{Tag.CELL_ID}` = '{cell_id}'"
    lost = [run.info.run_id for run in iter_runs(client, experiment_id, query)
            if run.info.run_id != current_run_id and run.info.start_time <= start]
    for run_id in lost:
        client.set_tag(run_id, "error", "attempt lost: its process died before it ended this run (a killed worker "
                                        f"or a lost node); the cell was run again as run {current_run_id}")
        client.set_tag(run_id, "superseded_by", current_run_id)
        client.set_terminated(run_id, status=LOST)
    if lost:
        log.warning("cell %s: ended %d lost attempt(s) as %s: %s", cell_id, len(lost), LOST, ", ".join(lost))
    return lost


def close_orphaned_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> list[str]:
    """End as KILLED the child runs of ``parent_run_id`` still RUNNING, once the invocation's trials are over
    (``tuner.fit()`` returned, so none of them is alive): attempts whose process died and whose cell was not
    retried (``max_failures`` exhausted). Returns their run ids. (A later sweep that runs their cells again ends
    them too: :func:`close_lost_attempts`.)"""
    from mlflow.tracking import MlflowClient

    from puregen_dist.tracking.reader import check_run_id

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = f"attributes.status = 'RUNNING' AND tags.`{Tag.PARENT_RUN_ID}` = '{check_run_id(parent_run_id)}'"
    orphans = [run.info.run_id for run in iter_runs(client, found.experiment_id, query)]
    for run_id in orphans:
        client.set_tag(run_id, "error", "attempt lost: its process died before it ended this run, and the cell "
                                        "was not retried (max_failures exhausted)")
        client.set_terminated(run_id, status=LOST)
    if orphans:
        log.warning("ended %d run(s) of dead attempts as %s: %s", len(orphans), LOST, ", ".join(orphans))
    return orphans


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one cell, one MLflow child run (FINISHED, or FAILED with the error).

    Idempotent: a cell that already has a finished child run in the sweep's experiment is not run again
    (a restored Tune experiment or a re-run sweep never duplicates a result). A retried attempt (the previous
    one's worker was killed or its node lost) ends the dead attempt's run as KILLED (:func:`close_lost_attempts`),
    so a cell has one FINISHED run and none left RUNNING.
    """
    from ray import tune

    from puregen_dist.tracking.mlflow_tracker import MLflowTracker

    spec = config["trial"]
    load_plugins()  # a Tune worker is an entry point: register built-ins and $PUREGEN_DIST_PLUGINS
    cfg = build(ExperimentConfig, spec["config"], source=f"cell {spec['cell_id']}")
    if cfg.classifier.threads:
        import torch

        torch.set_num_threads(cfg.classifier.threads)
    if spec["cell_id"] in finished_cells(spec["tracking_uri"], cfg.tracking.experiment):
        tune.report({"already_finished": 1.0})
        return
    tracker = MLflowTracker(spec["tracking_uri"], cfg.tracking.experiment,
                            run_name=f"{spec['row']} | {spec['col']} | {cfg.classifier.name} | seed {cfg.seed}",
                            parent_run_id=spec["parent_run_id"], tags={Tag.CELL_ID: spec["cell_id"], **node_tags()})
    try:
        lost = close_lost_attempts(spec["tracking_uri"], tracker.experiment_id, spec["cell_id"], tracker.run_id)
        if lost:
            tracker.set_tags({"retry_of": ",".join(lost)})
    except Exception as exc:  # bookkeeping only: never fail the attempt for it
        log.warning("cell %s: could not end lost attempts: %s", spec["cell_id"], exc)
    try:
        metrics = execute_trial(spec, tracker, report=lambda m, step: tune.report({**m, "epoch": step}))
    except BaseException as exc:
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000],
                          "error_traceback": traceback.format_exc()[-5000:]})
        tracker.close("FAILED")
        raise
    tracker.close(FINISHED)
    tune.report({**metrics.as_dict(), "epoch": cfg.classifier.epochs, "done": 1.0})
