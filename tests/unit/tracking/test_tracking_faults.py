"""Tracking faults and bad inputs (issue 16): a new sqlite database raced by several processes, a read-only or
unusable store refused before anything is computed, an unreachable server named, writes retried while the
store is busy (and a loud error once the retries are spent), Ctrl-C ending a run KILLED, no credential logged,
``report --parent`` validated, and only a Tune directory this project started ever restored."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from puregen_dist.config.errors import UserInputError
from puregen_dist.tracking import NullTracker
from puregen_dist.tracking.base import status_for
from puregen_dist.tracking.mlflow_tracker import (
    BACKOFF_ENV,
    RETRIES_ENV,
    MLflowTracker,
    TrackingError,
    ensure_experiment,
    ensure_sqlite_database,
    resolve_tracking_uri,
)
from puregen_dist.tracking.redaction import MASK, redact, redact_uri, redacted_file, secret_values

mlflow = pytest.importorskip("mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

LOCKED = "(sqlite3.OperationalError) database is locked"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """One complete MLflow database (its migrations take seconds): tests copy it."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    ensure_sqlite_database(path)
    return path


@pytest.fixture
def uri(template_db, tmp_path, monkeypatch) -> str:
    """A fresh copy of the template database; fast retries."""
    monkeypatch.setenv(BACKOFF_ENV, "0.01")
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"


def _status(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).info.status


# ------------------------------------------------------------------------------ a new database, raced


def _create_and_log(uri: str, index: int) -> None:
    with MLflowTracker(uri, "race", run_name=f"p{index}") as tracker:
        tracker.log_metrics({"m": float(index)}, step=1)


def test_processes_racing_on_a_new_database_all_create_their_runs(tmp_path):
    """Two processes open one database that does not exist yet (the bug: they died with alembic's CommandError
    or "table ... already exists", each MlflowClient migrating the file the other was migrating; 3 of 3 CLI runs
    started together failed)."""
    path = tmp_path / "new" / "mlflow.db"
    uri = f"sqlite:///{path.as_posix()}"
    context = multiprocessing.get_context("fork")  # MLflow is imported already: no re-import per process
    processes = [context.Process(target=_create_and_log, args=(uri, i)) for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [p.exitcode for p in processes] == [0, 0]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["p0", "p1"]
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.data.metrics["m"] for r in runs} == {0.0, 1.0}
    assert [p.name for p in path.parent.iterdir()] == ["mlflow.db"]  # no private build file left


# ------------------------------------------------------------------------------ unusable stores, refused


def _as_nobody(calls: list[str]) -> list[str]:
    """The UserInputError message (or 'ok') of ``ensure_experiment(uri, 'x')`` for each uri, run as an
    unprivileged user when this process is root (root writes read-only files)."""

    def attempt() -> list[str]:
        out = []
        for call_uri in calls:
            try:
                ensure_experiment(call_uri, "x")
                out.append("ok")
            except UserInputError as exc:
                out.append(str(exc))
        return out

    if os.geteuid() != 0:
        return attempt()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            result = attempt()
        except BaseException as exc:  # noqa: BLE001
            result = [f"child error: {exc!r}"]
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_read_only_database_or_directory_is_a_user_error_naming_it(template_db):
    root = Path(tempfile.mkdtemp(prefix="puregen-ro-"))  # traversable by an unprivileged user (tmp_path is not)
    try:
        root.chmod(0o755)
        database = root / "mlflow.db"
        shutil.copy(template_db, database)
        database.chmod(0o444)
        locked_dir = root / "locked"
        locked_dir.mkdir()
        locked_dir.chmod(0o555)
        before = database.read_bytes()
        messages = _as_nobody([f"sqlite:///{database}", f"sqlite:///{locked_dir}/mlflow.db",
                               f"sqlite:///{locked_dir}/deeper/mlflow.db"])
        assert f"MLflow database {database} is read-only" in messages[0]
        assert f"cannot be created: directory {locked_dir} is read-only" in messages[1]
        assert f"directory {locked_dir} is read-only" in messages[2]
        assert database.read_bytes() == before and list(locked_dir.iterdir()) == []
    finally:
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)


def test_unusable_uris_are_user_errors_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREGEN_TRACKING_PROBE_S", "0.2")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserInputError, match=rf"server http://\*\*\*@127.0.0.1:{port} does not answer") as err:
        ensure_experiment(f"http://alice:hunter2-pw@127.0.0.1:{port}", "x")
    assert "hunter2" not in str(err.value)
    with pytest.raises(UserInputError, match="'banana://x': unsupported"):
        ensure_experiment("banana://x", "x")
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(UserInputError, match="notes.txt: not an SQLite database"):
        ensure_experiment(f"sqlite:///{tmp_path / 'notes.txt'}", "x")
    assert (tmp_path / "notes.txt").read_text() == "my notes"  # not moved aside as an "incomplete" database
    with pytest.raises(UserInputError, match="notes.txt is a file, not a directory"):
        ensure_experiment(f"sqlite:///{tmp_path / 'notes.txt' / 'mlflow.db'}", "x")
    with pytest.raises(UserInputError, match="experiment name is empty"):
        ensure_experiment(f"sqlite:///{tmp_path / 'a.db'}", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///out/mlflow.db", "x") == f"sqlite:///{tmp_path.as_posix()}/out/mlflow.db"


def test_a_deleted_experiment_is_a_user_error(uri):
    client = MlflowClient(uri)
    client.delete_experiment(ensure_experiment(uri, "gone"))
    with pytest.raises(UserInputError, match="'gone' .* was deleted"):
        MLflowTracker(uri, "gone")


# ------------------------------------------------------------------------------ retries, loud failures


class FlakyClient:
    """An MlflowClient whose first ``failures`` ``log_batch`` calls raise ``error`` (a fault injector)."""

    def __init__(self, client: MlflowClient, failures: int, error: Exception) -> None:
        self.client, self.failures, self.error, self.calls = client, failures, error, 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.client.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_a_locked_database_is_retried_and_no_metric_is_lost(uri, monkeypatch, caplog):
    monkeypatch.setenv(RETRIES_ENV, "3")
    tracker = MLflowTracker(uri, "flaky")
    tracker.client = FlakyClient(tracker.client, 2, MlflowException(LOCKED, TEMPORARILY_UNAVAILABLE))
    with tracker:
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(5))
    assert sum("database is locked" in r.getMessage() and "retry" in r.getMessage() for r in caplog.records) == 2


def test_a_server_cut_mid_request_is_retried_for_idempotent_writes_only(uri, monkeypatch):
    """A request the server may have received (connection reset) is retried for log_batch (same timestamps:
    stored once), never for create_run (it could create a second run)."""
    monkeypatch.setenv(RETRIES_ENV, "2")
    reset = MlflowException("API request to http://x/api/2.0/mlflow/runs/log-batch failed with exception "
                            "('Connection aborted.', RemoteDisconnected('Remote end closed connection'))")
    tracker = MLflowTracker(uri, "cut")
    tracker.client = FlakyClient(tracker.client, 1, reset)
    tracker.log_metrics({"a": 1.0}, step=0)
    assert [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "a")] == [0]
    from puregen_dist.tracking.mlflow_tracker import transient

    assert transient(reset, idempotent=True) and not transient(reset, idempotent=False)
    refused = MlflowException("... Max retries exceeded ... NewConnectionError ... [Errno 111] Connection refused")
    assert transient(refused, idempotent=False)
    assert not transient(MlflowException("(sqlite3.OperationalError) database or disk is full",
                                         TEMPORARILY_UNAVAILABLE))


def test_a_store_that_stays_down_fails_loudly(uri, monkeypatch):
    monkeypatch.setenv(RETRIES_ENV, "2")
    tracker = MLflowTracker(uri, "down")
    tracker.client = FlakyClient(tracker.client, 99, MlflowException(LOCKED, TEMPORARILY_UNAVAILABLE))
    with pytest.raises(TrackingError, match=r"logging metrics \(step 7\) still failed after 3 attempts"):
        tracker.log_metrics({"loss": 0.5}, step=7)


# ------------------------------------------------------------------------------ Ctrl-C: KILLED


def test_keyboard_interrupt_ends_the_run_killed_and_an_error_failed(uri):
    with pytest.raises(KeyboardInterrupt):
        with MLflowTracker(uri, "stop") as interrupted:
            interrupted.log_metrics({"loss": 1.0}, step=1)
            raise KeyboardInterrupt
    with pytest.raises(RuntimeError):
        with MLflowTracker(uri, "stop") as failed:
            raise RuntimeError("boom")
    with MLflowTracker(uri, "stop") as finished:
        pass
    assert [_status(uri, t.run_id) for t in (interrupted, failed, finished)] == ["KILLED", "FAILED", "FINISHED"]
    assert [status_for(e) for e in (None, KeyboardInterrupt, SystemExit, ValueError)] == [
        "FINISHED", "KILLED", "KILLED", "FAILED"]
    null = NullTracker()
    null.close = lambda status: setattr(null, "status", status)
    with pytest.raises(KeyboardInterrupt), null:
        raise KeyboardInterrupt
    assert null.status == "KILLED"


# ------------------------------------------------------------------------------ secrets


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw-6f1e2d", "RAY_AUTH_TOKEN": "ray-token-9a8b7c6d5e",
           "AWS_SECRET_ACCESS_KEY": "aws/Secret+Key0123456789"}


def test_redaction_masks_uri_credentials_secret_env_values_and_the_ray_token_file(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    token_file = tmp_path / "token"
    token_file.write_text("ray-file-token-4242\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a mode, not a secret: "token" elsewhere stays
    assert redact_uri("http://user:p@ss@host:5000/x") == f"http://{MASK}@host:5000/x"
    assert redact_uri("postgresql+psycopg2://u:pw@db/mlflow") == f"postgresql+psycopg2://{MASK}@db/mlflow"
    assert redact_uri("s3://b/k?X-Amz-Signature=abc&x=1") == f"s3://b/k?X-Amz-Signature={MASK}&x=1"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    text = redact("uri https://tok@h/ pw mlflow-pw-6f1e2d key aws/Secret+Key0123456789 file ray-file-token-4242 "
                  "mode token")
    assert text == f"uri https://{MASK}@h/ pw {MASK} key {MASK} file {MASK} mode token"
    assert "ray-token-9a8b7c6d5e" in secret_values() and str(token_file) not in secret_values()


def test_params_tags_run_name_and_text_artifacts_are_redacted(uri, tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    leaked = "http://bob:s3cr3t-pw@mlflow.internal:5000"
    config = tmp_path / "config.yaml"
    config.write_text(f"tracking:\n  uri: {leaked}\nname: {SECRETS['RAY_AUTH_TOKEN']}\n")
    image = tmp_path / "raw.bin"
    image.write_bytes(b"\0\x01" + SECRETS["RAY_AUTH_TOKEN"].encode())  # binary: uploaded unchanged
    with MLflowTracker(uri, "secrets", run_name=f"run {SECRETS['AWS_SECRET_ACCESS_KEY']}",
                       tags={"cmd": f"--set tracking.uri={leaked}"}) as tracker:
        tracker.log_params({"tracking.uri": leaked, "other": SECRETS["MLFLOW_TRACKING_PASSWORD"]})
        tracker.set_tags({"error": f"API request to {leaked}/api failed"})
        tracker.log_artifact(config)
    run = MlflowClient(uri).get_run(tracker.run_id)
    logged = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
    downloaded = Path(MlflowClient(uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl")))
    logged.append(downloaded.read_text())
    for secret in ("s3cr3t-pw", "bob:", *SECRETS.values()):
        assert not any(secret in text for text in logged), secret
    assert run.data.params["tracking.uri"] == f"http://{MASK}@mlflow.internal:5000"
    with redacted_file(image) as same:
        assert same == image


# ------------------------------------------------------------------------------ report --parent


def test_report_parent_is_checked_as_a_run_id(uri, capsys):
    from puregen_dist.cli import main

    ensure_experiment(uri, "exp")
    assert main(["report", "exp", "--tracking-uri", uri, "--parent", "x' OR '1'='1"]) == 2
    err = capsys.readouterr().err
    assert "report --parent" in err and "not an MLflow run id" in err


# ------------------------------------------------------------------------------ Tune restore


class Boom:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_only_a_tune_directory_this_runner_started_is_restored(tmp_path):
    from puregen_dist.sweep import runner

    sweep = SimpleNamespace(name="s", settings=SimpleNamespace(storage=str(tmp_path / "tune")))
    cells = ["cell-a", "cell-b"]
    assert runner.restorable_tune_experiment(sweep, cells) is False  # nothing there: a fresh start
    _, path = runner.tune_experiment(sweep, cells)
    sentinel = tmp_path / "unpickled"
    Path(path).mkdir(parents=True)
    (Path(path) / "tuner.pkl").write_bytes(pickle.dumps(Boom(str(sentinel))))
    with pytest.raises(UserInputError, match=f"no {runner.TUNE_MARKER}.*not restored"):
        runner.restorable_tune_experiment(sweep, cells)
    runner._write_text(f"{path}/{runner.TUNE_MARKER}", json.dumps(runner.tune_marker(sweep, ["other"])))
    with pytest.raises(UserInputError, match="another sweep or set of cells"):
        runner.restorable_tune_experiment(sweep, cells)
    runner._write_text(f"{path}/{runner.TUNE_MARKER}", json.dumps(runner.tune_marker(sweep, cells)))
    assert runner.restorable_tune_experiment(sweep, cells) is True
    assert not sentinel.exists()

