"""The sqlite tracking database is created atomically (issue 13): a half-created file never blocks a later run,
and processes creating the same new database at once all get one complete database."""

from __future__ import annotations

import multiprocessing
import sqlite3

from mlflow.tracking import MlflowClient

from puregen_dist.tracking.mlflow_tracker import ensure_experiment, ensure_sqlite_database


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_new_database_is_complete_and_nothing_else_is_left(tmp_path):
    path = tmp_path / "out" / "mlflow.db"
    ensure_sqlite_database(path)
    assert {"alembic_version", "experiments", "runs"} <= _tables(path)
    assert [p.name for p in path.parent.iterdir()] == ["mlflow.db"]  # the private build file is gone


def test_a_half_created_database_is_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as conn:  # what a creator killed during MLflow's first migration leaves
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    experiment = ensure_experiment(f"sqlite:///{path}", "after-a-crash")
    assert MlflowClient(f"sqlite:///{path}").get_experiment(experiment).name == "after-a-crash"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mlflow.db.incomplete-")]
    assert len(aside) == 1 and _tables(aside[0]) == {"alembic_version"}


def test_an_empty_file_is_rebuilt_and_a_complete_one_is_kept(tmp_path):
    path = tmp_path / "mlflow.db"
    path.write_bytes(b"")
    first = ensure_experiment(f"sqlite:///{path}", "x")
    inode = path.stat().st_ino
    assert ensure_experiment(f"sqlite:///{path}", "x") == first and path.stat().st_ino == inode


def test_the_default_artifact_root_is_beside_the_database(tmp_path):
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    experiment = MlflowClient(uri).get_experiment(ensure_experiment(uri, "x"))
    assert experiment.artifact_location == (tmp_path / "db" / "mlartifacts").as_uri()  # never ./mlruns


def _create(path: str, name: str) -> str:
    return ensure_experiment(f"sqlite:///{path}", name)


def test_concurrent_creators_share_one_complete_database(tmp_path):
    path = tmp_path / "mlflow.db"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.starmap(_create, [(str(path), "same")] * 4)
    assert len(set(ids)) == 1
    assert {e.name for e in MlflowClient(f"sqlite:///{path}").search_experiments()} == {"same", "Default"}
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]
