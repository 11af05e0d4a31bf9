"""The one reader of a sweep's MLflow runs: what resume (:func:`finished_cells`) and the report
(:func:`read_runs`) see.

Runs come back page by page (every page, following MLflow's ``page_token``) as a pandas DataFrame with
MLflow's own ``search_runs`` columns: ``run_id``, ``experiment_id``, ``status``, ``artifact_uri``,
``start_time`` and ``end_time`` (UTC timestamps), then ``metrics.<name>`` (the latest value; NaN where a run
lacks it), ``params.<name>`` and ``tags.<name>`` (strings; NaN where a run lacks them). Tag, metric and
param names are in :mod:`puregen_dist.tracking.names`.

MLflow is imported in function bodies only: importing this module imports neither MLflow nor Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from puregen_dist.config.errors import UserInputError
from puregen_dist.tracking.names import Tag, metric_column, param_column, tag_column

PAGE_SIZE = 1000
"""Runs per ``search_runs`` request."""
FINISHED = "FINISHED"
INFO_COLUMNS = ("run_id", "experiment_id", "status", "artifact_uri", "start_time", "end_time")
"""The run-info columns of :func:`runs_frame`, first and in this order (as in ``mlflow.search_runs``)."""
_RUN_ID = re.compile(r"[0-9a-fA-F]{32}")


def check_run_id(run_id: str, what: str = "--parent") -> str:
    """``run_id`` when it is an MLflow run id (32 hex digits), so that it can be pasted into a filter string.

    Raises:
        UserInputError: anything else (quotes, spaces, a run name, a truncated id, ...), naming ``what`` (the
            option or field it came from).
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise UserInputError(f"{what}: {run_id!r} is not an MLflow run id (32 hexadecimal digits, e.g. the parent "
                             "run id printed by `puregen-dist sweep` or shown by `mlflow ui`)")
    return run_id


def runs_filter(*, parent_run_id: str | None = None, finished_only: bool = True) -> str:
    """The MLflow filter string: status FINISHED (when ``finished_only``) and child of ``parent_run_id``
    (when given; validated by :func:`check_run_id`)."""
    clauses = [f"attributes.status = '{FINISHED}'"] if finished_only else []
    if parent_run_id is not None:
        clauses.append(f"tags.`{Tag.PARENT_RUN_ID}` = '{check_run_id(parent_run_id)}'")
    return " AND ".join(clauses)


def read_runs(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None,
              finished_only: bool = True, page_size: int | None = None) -> pd.DataFrame:
    """Every run of ``experiment`` (optionally only the children of one parent run, only FINISHED ones),
    oldest first, as a DataFrame of MLflow's ``search_runs`` columns (see the module docstring).

    Args:
        tracking_uri: MLflow tracking URI (e.g. ``sqlite:////abs/out/mlflow.db``).
        experiment: experiment name (a sweep's name).
        parent_run_id: only runs tagged ``mlflow.parentRunId`` = this run id (32 hex digits).
        finished_only: only runs whose status is FINISHED.
        page_size: runs per request (default :data:`PAGE_SIZE`); every page is read.

    Raises:
        UserInputError: ``parent_run_id`` is not a run id, no database at a ``sqlite:///`` URI (none is
            created), or no active experiment named ``experiment`` (the message lists the existing ones).
    """
    from mlflow.tracking import MlflowClient

    filter_string = runs_filter(parent_run_id=parent_run_id, finished_only=finished_only)
    missing = missing_database(tracking_uri)
    if missing is not None:
        raise UserInputError(f"no MLflow database at {missing} (tracking URI {tracking_uri})")
    client = MlflowClient(tracking_uri)
    experiment_id = _active_experiment_id(client, experiment, tracking_uri)
    return runs_frame(iter_runs(client, experiment_id, filter_string, page_size=page_size or PAGE_SIZE))


def finished_cells(tracking_uri: str, experiment: str) -> set[str]:
    """``cell_id`` tags of the FINISHED runs of ``experiment``: the sweep cells that resume skips.

    Empty when the experiment does not exist, or when a ``sqlite:///`` database does not exist (none is
    created).
    """
    from mlflow.tracking import MlflowClient

    if missing_database(tracking_uri) is not None:
        return set()
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return set()
    runs = iter_runs(client, found.experiment_id, runs_filter(), page_size=PAGE_SIZE)
    return {run.data.tags[Tag.CELL_ID] for run in runs if Tag.CELL_ID in run.data.tags}


def iter_runs(client: Any, experiment_id: str, filter_string: str = "", *,
              page_size: int = PAGE_SIZE) -> Iterator[Any]:
    """The ``mlflow.entities.Run`` objects matching ``filter_string`` in one experiment, oldest first,
    requesting page after page until MLflow returns no ``page_token``.

    Args:
        client: an ``MlflowClient``.
        experiment_id: the experiment's id.
        filter_string: an MLflow search filter (e.g. :func:`runs_filter`).
        page_size: runs per request.
    """
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=page_size,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def runs_frame(runs: Iterable[Any]) -> pd.DataFrame:
    """MLflow runs as a DataFrame with ``mlflow.search_runs``' columns: :data:`INFO_COLUMNS`, then the
    ``metrics.*``, ``params.*`` and ``tags.*`` columns (each sorted by name; NaN where a run lacks one)."""
    frame = pd.DataFrame([_flat_run(run) for run in runs])
    if frame.empty:
        return pd.DataFrame(columns=list(INFO_COLUMNS))
    for column in ("start_time", "end_time"):
        frame[column] = pd.to_datetime(frame[column], unit="ms", utc=True)
    data_columns = sorted(c for c in frame.columns if c not in INFO_COLUMNS)
    return frame[list(INFO_COLUMNS) + data_columns]


def _flat_run(run: Any) -> dict[str, Any]:
    """One run as a flat dict of :func:`runs_frame`'s columns."""
    info, data = run.info, run.data
    return {"run_id": info.run_id, "experiment_id": info.experiment_id, "status": info.status,
            "artifact_uri": info.artifact_uri, "start_time": info.start_time, "end_time": info.end_time,
            **{metric_column(k): float(v) for k, v in data.metrics.items()},
            **{param_column(k): v for k, v in data.params.items()},
            **{tag_column(k): v for k, v in data.tags.items()}}


def missing_database(tracking_uri: str) -> Path | None:
    """The database path of a ``sqlite:///`` URI when that file does not exist, else None (MlflowClient would
    silently create an empty database at a mistyped path)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return None if db.is_file() else db


def latest_metric_histories(tracking_uri: str, experiment: str) -> dict[str, list[tuple[int, float]]]:
    """Metric name -> [(step, value)] sorted by step, of the latest FINISHED run of ``experiment`` (e.g. the
    ρ curves a ``diagnose`` run logged against the purification step).

    Raises:
        UserInputError: no database at a ``sqlite:///`` URI, no such experiment, or no finished run in it.
    """
    from mlflow.tracking import MlflowClient

    runs = read_runs(tracking_uri, experiment)
    if runs.empty:
        raise UserInputError(f"no finished run in MLflow experiment {experiment!r} at {tracking_uri}")
    run_id = runs.sort_values(["start_time", "run_id"]).iloc[-1]["run_id"]
    client = MlflowClient(tracking_uri)
    names = [c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")]
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}


def snapshot_database(tracking_uri: str, dest: str | Path) -> Path:
    """A consistent copy at ``dest`` of the sqlite database behind ``tracking_uri`` (sqlite's online backup, so a
    sweep may be writing to it meanwhile; then VACUUM), moved into place atomically: a report published with the
    runs it came from, which anyone can re-derive with ``--tracking-uri sqlite:///<dest>``.

    Raises:
        UserInputError: not a ``sqlite:///`` URI, no database there, or ``dest`` is that database.
    """
    import sqlite3

    if not tracking_uri.startswith("sqlite:///"):
        raise UserInputError(f"--with-runs copies a sqlite database; the tracking URI is {tracking_uri} (export "
                             "the runs from that server instead)")
    if (missing := missing_database(tracking_uri)) is not None:
        raise UserInputError(f"{tracking_uri}: no MLflow database at {missing}")
    dest = Path(dest)
    source_path = Path(tracking_uri.removeprefix("sqlite:///"))
    if dest.resolve() == source_path.resolve():
        raise UserInputError(f"--with-runs: {dest} is the database the report reads; give another --report-dir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with contextlib.closing(sqlite3.connect(source_path)) as source, \
                contextlib.closing(sqlite3.connect(tmp)) as copy:
            source.backup(copy)
            copy.execute("VACUUM")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _active_experiment_id(client: Any, experiment: str, tracking_uri: str) -> str:
    """The id of the active experiment named ``experiment``; UserInputError listing the existing ones."""
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "active":
        return found.experiment_id
    names = sorted(e.name for e in client.search_experiments())
    raise UserInputError(
        f"no MLflow experiment named {experiment!r} at {tracking_uri}"
        f"{' (it was deleted)' if found is not None else ''}; existing experiments: "
        f"{', '.join(map(repr, names)) or 'none'}"
    )


__all__ = ["FINISHED", "INFO_COLUMNS", "PAGE_SIZE", "check_run_id", "finished_cells", "iter_runs",
           "missing_database", "read_runs", "runs_filter", "runs_frame"]
