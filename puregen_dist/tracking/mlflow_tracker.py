"""MLflow behind the Tracker protocol: the writer (``tracking/reader.py`` is the reader).

Default backend: a sqlite database at an absolute path in the output directory (never the deprecated file
store). ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it (e.g. ``http://mlflow:5000`` on clusters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

MAX_PARAM_LENGTH = 6000  # MLflow 3.x param value limit


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """``configured``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs output_dir>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Create (once, on the driver) the experiment ``name`` with an absolute artifact location; its id."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


class MLflowTracker:
    """One MLflow run; logs through an explicit client (no global active-run state, safe in Ray workers)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        artifact_root: Path | None = None,
    ) -> None:
        self.tracking_uri = uri
        self.client = MlflowClient(uri)
        self.experiment_id = ensure_experiment(uri, experiment, artifact_root)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id: str = run.info.run_id
        self._closed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        batch = [mlflow.entities.Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _log_metric_batches(self.client, self.run_id, metrics, step or 0)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        batch = [mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """(H, W, C) uint8 image as ``images/<name>.png``."""
        self.client.log_image(self.run_id, image if image.shape[2] == 3 else image[:, :, 0],
                              artifact_file=f"images/{name}.png")

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self.client.set_terminated(self.run_id, status=status)
            self._closed = True

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


def log_metrics_to_run(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Add ``metrics`` to the existing run ``run_id`` (finished or not; its status is unchanged): results
    computed after a run ended, such as a sweep cell's floor."""
    _log_metric_batches(MlflowClient(uri), run_id, metrics, step)


def _log_metric_batches(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """The finite values of ``metrics`` at ``step``, in batches of MLflow's 1,000-metric limit."""
    now = mlflow.utils.time.get_current_time_millis()
    batch = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()
             if v is not None and math.isfinite(float(v))]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
