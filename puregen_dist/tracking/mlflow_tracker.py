"""MLflow behind the Tracker protocol: the writer (``tracking/reader.py`` is the reader).

Default backend: a sqlite database at an absolute path in the output directory (never the deprecated file
store). ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it (e.g. ``http://mlflow:5000`` on clusters).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow 3.x param value limit


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    """``configured``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<abs output_dir>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db').as_posix()}"


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Create (once, on the driver) the experiment ``name``; its id. Its artifacts go to ``artifact_root``,
    by default ``mlartifacts`` beside a sqlite database (never ``./mlruns`` of whatever directory the process
    runs in, such as a Ray job's working-dir cache) and the server's own store for a tracking server."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        ensure_sqlite_database(database)
        artifact_root = artifact_root or database.parent / "mlartifacts"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another process created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ensure_sqlite_database(path: Path) -> None:
    """An MLflow sqlite database at ``path`` with its whole schema. A new one is built in a private file
    beside ``path`` and hard-linked into place, so a killed or concurrent creator never leaves a half-created
    database there (two processes migrating one new file fail with "table ... already exists"); the first link
    wins, the others use it. A file at ``path`` without MLflow's tables (left by an older, interrupted run:
    it holds no runs) is moved aside to ``<name>.incomplete-<time>`` with a warning, and rebuilt."""
    if path.exists():
        if _is_complete(path):
            return
        aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("%s had no complete MLflow schema (an interrupted creation); moved to %s and rebuilt",
                    path, aside)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{secrets.token_hex(6)}.creating")
    try:
        MlflowClient(f"sqlite:///{private}").search_experiments(max_results=1)  # runs MLflow's migrations
        try:
            os.link(private, path)
        except FileExistsError:
            pass  # another process linked its complete database first
    finally:
        private.unlink(missing_ok=True)


def _is_complete(path: Path) -> bool:
    """Whether the sqlite file at ``path`` holds MLflow's schema (a recorded migration, experiments, runs)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"alembic_version", "experiments", "runs"} <= tables:
                return False
            return conn.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] > 0
    except sqlite3.DatabaseError:
        return False


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
