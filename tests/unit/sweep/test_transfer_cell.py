"""A transfer cell without Ray: a `models:` classifier pretrained into the store, referenced as
`classifier.pretrained: model:<name>`, then a linear-transfer trial that reads only artifacts."""

from __future__ import annotations

from puregen_dist.generative.checkpoints import read_checkpoint_config
from puregen_dist.pipeline.stages import build_model_artifact, build_poison_artifact
from puregen_dist.pipeline.store import ArtifactStore
from puregen_dist.sweep.plan import plan_sweep
from puregen_dist.sweep.spec import sweep_from_dict
from puregen_dist.sweep.trial import execute_trial, trial_spec
from puregen_dist.tracking import NullTracker

DIGITS = {"dataset": "digits", "train_per_class": 10}


def test_linear_transfer_cell_reads_a_pretrained_classifier_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    sweep = sweep_from_dict({
        "name": "transfer",
        "base": {"data": {**DIGITS, "train_partitions": 2, "train_partition": 0},
                 "attack": {"name": "badnets", "target_class": 0, "budget": 0.2},
                 "classifier": {"name": "small_cnn", "epochs": 2, "batch_size": 16, "lr": 0.05, "milestones": [],
                                "transfer": "linear", "pretrained": "model:pre", "device": "cpu"}},
        "models": {"pre": {"kind": "classifier", "data": {**DIGITS, "train_partitions": 2, "train_partition": 1},
                           "classifier": {"name": "small_cnn", "epochs": 2, "batch_size": 16, "lr": 0.05,
                                          "milestones": [], "device": "cpu"},
                           "tracking": {"enabled": False}}},
        "settings": {"store": str(store.uri)}}, source="transfer.yaml")
    plan = plan_sweep(sweep, store)
    key = sweep.model_keys()["pre"]
    assert [m.key for m in plan.models] == [key] and key.startswith("classifier-")
    assert sweep.cells[0].config.classifier.pretrained == key
    manifest, built = build_model_artifact(plan.models[0].job, store.uri, str(tmp_path))
    assert built and manifest["kind"] == "classifier"
    assert read_checkpoint_config(store.get_dir(key))["model"]["name"] == "small_cnn"
    build_poison_artifact(plan.poisons[0].job, store.uri)
    trial = plan.trials[0]
    assert trial.tags()["artifact.classifier"] == key
    spec = trial_spec(trial, sweep="transfer", store_uri=store.uri, tracking_uri="unused", parent_run_id=None)
    metrics = execute_trial(spec, NullTracker())
    assert 0.0 <= metrics.nat_acc <= 1.0 and 1.0 in metrics.poison_success
    assert len(metrics.history) == 2
