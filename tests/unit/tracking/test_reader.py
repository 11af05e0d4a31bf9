"""The MLflow reader (sqlite): paging, MLflow's own DataFrame columns, the parent filter, run-id validation,
finished cells, and what a missing database or experiment does."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from puregen_dist.config.errors import UserInputError
from puregen_dist.tracking import reader
from puregen_dist.tracking.names import Tag, metric_column, success_key, tag_column
from puregen_dist.tracking.reader import (
    INFO_COLUMNS,
    check_run_id,
    finished_cells,
    read_runs,
    runs_filter,
)

mlflow = pytest.importorskip("mlflow")

CHILDREN = 5
"""Finished children of parent P (more than the page sizes the tests use)."""
FINISHED_RUNS = 1 + CHILDREN + 2 + 1  # P, its finished children, Q's children, the run without a parent


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Experiment "exp": parent P (FINISHED) with 5 finished children (c0..c4, metric nat_acc, param p)
    and one failed child (f); parent Q (RUNNING) with 2 finished children (q0, q1); a finished run with a
    cell_id and no parent (orphan). Experiment "empty" has no runs; experiment "gone" is deleted."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from puregen_dist.tracking.mlflow_tracker import ensure_experiment

    tmp_path = tmp_path_factory.mktemp("reader_db")
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    exp = ensure_experiment(uri, "exp", tmp_path / "artifacts")
    ensure_experiment(uri, "empty", tmp_path / "artifacts")
    client = MlflowClient(uri)
    client.delete_experiment(ensure_experiment(uri, "gone", tmp_path / "artifacts"))
    parents = {name: client.create_run(exp, start_time=100 + i, tags={Tag.ROLE: "sweep"}).info.run_id
               for i, name in enumerate("PQ")}
    client.set_terminated(parents["P"])

    def run(cell: str, start: int, parent: str | None, status: str = "FINISHED") -> str:
        tags = {Tag.CELL_ID: cell, **({Tag.PARENT_RUN_ID: parents[parent]} if parent else {})}
        run_id = client.create_run(exp, start_time=start, tags=tags).info.run_id
        if cell.startswith("c"):
            client.log_batch(run_id, metrics=[Metric("nat_acc", 0.5 + start / 10_000, 0, 0)],
                             params=[Param("p", cell)])
        client.set_terminated(run_id, status=status)
        return run_id

    ids = {f"c{i}": run(f"c{i}", 1000 + i, "P") for i in range(CHILDREN)}
    ids["f"] = run("f", 2000, "P", "FAILED")
    ids.update({f"q{i}": run(f"q{i}", 3000 + i, "Q") for i in range(2)})
    ids["orphan"] = run("orphan", 4000, None)
    return uri, parents, ids


@pytest.fixture
def page_calls(monkeypatch):
    """Record (max_results, page_token) of every MlflowClient.search_runs call."""
    from mlflow.tracking import MlflowClient

    calls: list[tuple[int, str | None]] = []
    original = MlflowClient.search_runs

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("max_results"), kwargs.get("page_token")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", spy)
    return calls


# ----------------------------------------------------------------------------------------------- paging


def test_read_runs_follows_page_tokens_until_exhausted(db, page_calls):
    uri, _, _ = db
    frame = read_runs(uri, "exp", page_size=2)
    assert len(page_calls) == math.ceil(FINISHED_RUNS / 2)
    assert {size for size, _ in page_calls} == {2}
    assert page_calls[0][1] is None and all(token for _, token in page_calls[1:])
    assert len(frame) == FINISHED_RUNS and frame["run_id"].is_unique
    assert frame["start_time"].is_monotonic_increasing  # oldest first, across pages
    page_calls.clear()
    assert read_runs(uri, "exp")["run_id"].tolist() == frame["run_id"].tolist()
    assert len(page_calls) == 1


def test_finished_cells_reads_every_page(db, page_calls, monkeypatch):
    uri, _, _ = db
    monkeypatch.setattr(reader, "PAGE_SIZE", 3)
    expected = {f"c{i}" for i in range(CHILDREN)} | {"q0", "q1", "orphan"}
    assert finished_cells(uri, "exp") == expected  # any parent, FINISHED only (not "f")
    assert len(page_calls) == math.ceil(FINISHED_RUNS / 3) and {s for s, _ in page_calls} == {3}


# ------------------------------------------------------------------------------------------- the frame


def test_frame_has_mlflow_search_runs_columns_and_values(db, monkeypatch):
    uri, _, ids = db
    frame = read_runs(uri, "exp", finished_only=False)
    assert tuple(frame.columns[:len(INFO_COLUMNS)]) == INFO_COLUMNS
    assert {tag_column(Tag.CELL_ID), metric_column("nat_acc"), "params.p"} <= set(frame.columns)
    assert str(frame["start_time"].dt.tz) == "UTC"
    c0 = frame.set_index("run_id").loc[ids["c0"]]
    assert c0["metrics.nat_acc"] == pytest.approx(0.6) and c0["params.p"] == "c0"
    assert c0["start_time"] == pd.Timestamp(1000, unit="ms", tz="UTC")
    assert pd.isna(frame.set_index("run_id").loc[ids["orphan"], "metrics.nat_acc"])
    # the same table as MLflow's own search_runs(output_format="pandas"), up to column order and NaN/None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    theirs = mlflow.search_runs(experiment_names=["exp"], output_format="pandas")
    assert set(theirs.columns) == set(frame.columns)
    assert _records(theirs) == _records(frame)


def _records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """Rows sorted by run id, missing values as None."""
    frame = frame.sort_values("run_id")
    plain = frame.astype(object).where(frame.notna(), None)
    return [dict(sorted(row.items())) for row in plain.to_dict("records")]


def test_empty_experiment_is_an_empty_frame_with_the_info_columns(db):
    uri, _, _ = db
    frame = read_runs(uri, "empty")
    assert frame.empty and tuple(frame.columns) == INFO_COLUMNS


# ---------------------------------------------------------------------------------------- parent filter


def test_parent_filter_and_finished_only(db):
    uri, parents, ids = db
    children = read_runs(uri, "exp", parent_run_id=parents["P"])
    assert children["run_id"].tolist() == [ids[f"c{i}"] for i in range(CHILDREN)]
    assert set(children[tag_column(Tag.PARENT_RUN_ID)]) == {parents["P"]}
    with_failed = read_runs(uri, "exp", parent_run_id=parents["P"], finished_only=False)
    assert set(with_failed["run_id"]) == set(children["run_id"]) | {ids["f"]}
    assert read_runs(uri, "exp", parent_run_id=parents["Q"])["run_id"].tolist() == [ids["q0"], ids["q1"]]
    assert read_runs(uri, "exp", parent_run_id="0" * 32).empty


@pytest.mark.parametrize("bad", ["", "abc", "0" * 31, "0" * 33, "g" * 32, "0" * 31 + "'",
                                 "' OR tags.x = 'y", "0" * 32 + "' OR '1' = '1", " " + "0" * 31])
def test_parent_must_be_a_run_id(db, bad, tmp_path):
    uri, _, _ = db
    with pytest.raises(UserInputError, match="not an MLflow run id"):
        check_run_id(bad)
    with pytest.raises(UserInputError, match="not an MLflow run id"):
        read_runs(uri, "exp", parent_run_id=bad)
    missing = tmp_path / "mlflow.db"
    with pytest.raises(UserInputError, match="not an MLflow run id"):  # checked before the database is opened
        read_runs(f"sqlite:///{missing.as_posix()}", "exp", parent_run_id=bad)
    assert not missing.exists()


def test_run_ids_are_accepted_and_pasted_quoted():
    run_id = "0123456789abcdefABCDEF0123456789"
    assert check_run_id(run_id) == run_id
    assert runs_filter(parent_run_id=run_id) == (
        f"attributes.status = 'FINISHED' AND tags.`mlflow.parentRunId` = '{run_id}'")
    assert runs_filter(finished_only=False) == ""


# --------------------------------------------------------------------------------- missing db / experiment


def test_missing_database_is_an_error_for_the_report_and_empty_for_resume(tmp_path):
    missing = tmp_path / "nope" / "mlflow.db"
    uri = f"sqlite:///{missing.as_posix()}"
    with pytest.raises(UserInputError, match="no MLflow database"):
        read_runs(uri, "exp")
    assert finished_cells(uri, "exp") == set()
    assert not missing.exists() and not missing.parent.exists()  # neither call creates it


def test_missing_or_deleted_experiment(db):
    uri, _, _ = db
    assert finished_cells(uri, "missing-exp") == set()
    with pytest.raises(UserInputError, match="'missing-exp'") as info:
        read_runs(uri, "missing-exp")
    assert "'exp'" in str(info.value) and "'empty'" in str(info.value) and uri in str(info.value)
    with pytest.raises(UserInputError, match="it was deleted"):
        read_runs(uri, "gone")


def test_success_key_names():
    assert success_key(1.0) == "poison_success_m1" and success_key(1.5) == "poison_success_m1p5"


def test_snapshot_reads_the_same_runs_and_leaves_no_temporary(db, tmp_path):
    uri, parents, _ = db
    copy = reader.snapshot_database(uri, tmp_path / "published" / "mlflow.db")
    assert sorted(p.name for p in copy.parent.iterdir()) == ["mlflow.db"]
    original = read_runs(uri, "exp", parent_run_id=parents["P"])
    again = read_runs(f"sqlite:///{copy}", "exp", parent_run_id=parents["P"])
    assert again["run_id"].tolist() == original["run_id"].tolist()
    assert again[metric_column("nat_acc")].tolist() == original[metric_column("nat_acc")].tolist()


def test_snapshot_needs_an_existing_sqlite_database(tmp_path):
    with pytest.raises(UserInputError, match="copies a sqlite database; the tracking URI is http://"):
        reader.snapshot_database("http://127.0.0.1:5000", tmp_path / "mlflow.db")
    with pytest.raises(UserInputError, match="no MLflow database at"):
        reader.snapshot_database(f"sqlite:///{tmp_path / 'typo.db'}", tmp_path / "mlflow.db")
    assert not (tmp_path / "mlflow.db").exists()


def test_snapshot_refuses_to_overwrite_its_source(db):
    uri = db[0]
    with pytest.raises(UserInputError, match="is the database the report reads"):
        reader.snapshot_database(uri, uri.removeprefix("sqlite:///"))
