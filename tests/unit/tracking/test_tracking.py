from __future__ import annotations

from pathlib import Path

from puregen_dist.config.schema import TrackingConfig
from puregen_dist.tracking import NullTracker, open_tracker
from puregen_dist.tracking.mlflow_tracker import MLflowTracker, resolve_tracking_uri


def test_default_uri_is_an_absolute_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None, "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').as_posix()}"
    assert Path(uri.removeprefix("sqlite:///")).is_absolute()


def test_env_var_then_config_take_precedence(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(None, "out") == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db", "out") == "sqlite:////x/y.db"


def test_disabled_tracking_is_a_null_tracker(tmp_path):
    tracker = open_tracker(TrackingConfig(enabled=False), tmp_path / "out")
    assert isinstance(tracker, NullTracker) and not (tmp_path / "out").exists()
    tracker.log_metrics({"a": 1.0}, step=2)
    assert tracker.final_metrics() == {"a": 1.0}


def test_mlflow_tracker_logs_and_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with open_tracker(TrackingConfig(experiment="t"), tmp_path / "out", default_run_name="r") as tracker:
        assert isinstance(tracker, MLflowTracker)
        tracker.log_params({"a.b": 1, "c": None})
        tracker.log_metrics({"loss": 0.5, "bad": float("nan")}, step=3)
        tracker.set_tags({"k": "v"})
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params == {"a.b": "1", "c": "null"} and run.data.metrics == {"loss": 0.5}
    assert run.data.tags["k"] == "v"
    assert (tmp_path / "out" / "mlflow.db").is_file()
