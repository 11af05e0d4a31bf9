"""End to end: `puregen-dist run` on digits with the small CNN and a dirty-label BadNets patch, read back from
MLflow (issue #2 acceptance)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from puregen_dist.cli import main

QUICKSTART = Path(__file__).resolve().parents[2] / "sweeps" / "quickstart_run.yaml"


def run_quickstart(out_dir: Path, *overrides: str) -> None:
    assert main(["-q", "run", str(QUICKSTART), "--set", f"output_dir={out_dir}", *overrides]) == 0


def read_runs(out_dir: Path):
    """(tracking URI, runs DataFrame) of the run's default sqlite database, via ``mlflow.search_runs``."""
    uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    try:
        return uri, mlflow.search_runs(experiment_names=["quickstart-run"])
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def undefended(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("undefended")
    run_quickstart(out_dir)
    return read_runs(out_dir)


def test_undefended_backdoor_succeeds_and_is_readable_from_mlflow(undefended):
    uri, runs = undefended
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["metrics.poison_success_m1"] >= 0.80
    assert run["metrics.nat_acc"] >= 0.90
    assert run["params.attack.name"] == "badnets" and run["params.attack.label_mode"] == "dirty"
    assert run["params.classifier.name"] == "small_cnn" and run["params.defense.name"] == "none"
    assert "test image" in run["tags.metric.poison_success"]
    history = MlflowClient(uri).get_metric_history(run["run_id"], "test_acc")
    assert sorted(m.step for m in history) == list(range(1, 16))
    train_loss = MlflowClient(uri).get_metric_history(run["run_id"], "train_loss")
    assert len(train_loss) == 15
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run["run_id"])}
    assert {"config.yaml", "images"} <= artifacts


def test_jpeg_run_completes_and_records_both_metrics(tmp_path):
    """A defended run end to end (3 of the recipe's 15 epochs: nothing here depends on accuracy)."""
    run_quickstart(tmp_path, "--set", "defense.name=jpeg", "--set", "defense.quality=50",
                   "--set", "classifier.epochs=3", "--set", "classifier.milestones=[2]")
    _, runs = read_runs(tmp_path)
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["params.defense.quality"] == "50"
    assert 0.0 <= run["metrics.poison_success_m1"] <= 1.0 and 0.0 <= run["metrics.nat_acc"] <= 1.0
    assert run["metrics.defense_seconds"] > 0
