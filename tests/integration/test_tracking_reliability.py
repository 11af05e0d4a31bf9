"""Tracking under faults, end to end (issue 16): a real MLflow server (cluster/mlflow/server.sh) that becomes
unreachable mid-run loses no metric, and one that stays away fails the write loudly; a `run` with credentials in
its tracking URI and secrets in its environment logs none of them; Ctrl-C on `puregen-dist run` leaves the run
KILLED and no ./mlruns; eight processes writing one sqlite store lose no metric; an unreachable server at start
is a one-line error before anything is computed.

The outage is made by a TCP switch in front of the server (connections refused while it is off, open ones
reset when it goes off): what a client sees of a stopped and restarted server, without paying the server's
start-up twice (20-60 s on a busy 2-core machine)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from puregen_dist.cli import main
from puregen_dist.tracking.mlflow_tracker import (
    BACKOFF_ENV,
    PROBE_ENV,
    RETRIES_ENV,
    MLflowTracker,
    TrackingError,
    ensure_experiment,
    ensure_sqlite_database,
)

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "sweeps" / "quickstart_run.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Switch:
    """A TCP forwarder 127.0.0.1:``port`` -> 127.0.0.1:``target`` that can be turned off (new connections
    refused, open ones reset) and on again, on the same port."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()

    def on(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def off(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
            except OSError:
                pass
            listener.close()
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """``bash cluster/mlflow/server.sh`` on a free 127.0.0.1 port (one worker), started when the module starts so
    that it boots while the tests that need no server run: (process, port, its log)."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp / 'server.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "artifacts")}
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow" / "server.sh")], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        yield proc, port, tmp / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(server_process):
    """The server, once it answers, behind a :class:`Switch`."""
    proc, port, log = server_process
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    switch = Switch(port)
    switch.on()
    yield switch
    switch.off()


def test_an_unreachable_server_at_start_is_a_one_line_error_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROBE_ENV, "0.5")
    port = free_port()
    out = tmp_path / "out"
    assert main(["-q", "run", str(QUICKSTART), "--set", f"output_dir={out}",
                 "--set", f"tracking.uri=http://u:{URI_PASSWORD}@127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://***@127.0.0.1:{port} does not answer" in err and URI_PASSWORD not in err
    assert not out.exists()


def _running_run_with_metrics(db: Path) -> bool:
    """A RUNNING run with a per-epoch metric in the database (plain sqlite: the run is being written)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs JOIN metrics ON metrics.run_uuid = runs.run_uuid "
                                "WHERE runs.status = 'RUNNING'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_sigint_during_a_run_leaves_it_killed_and_no_mlruns_in_the_working_directory(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "puregen_dist", "-q", "run", str(QUICKSTART),
                             "--set", f"output_dir={out}", "--set", "classifier.epochs=500",
                             "--set", "data.train_per_class=12"],
                            cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _running_run_with_metrics(out / "mlflow.db"):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (130, -signal.SIGINT, 1), output[-3000:]  # the CLI's 130, or Python's own
    uri = f"sqlite:///{out / 'mlflow.db'}"
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("quickstart-run").experiment_id])
    assert run.info.status == "KILLED", output[-3000:]
    assert list(cwd.iterdir()) == []  # no ./mlruns, no ./mlflow.db
    experiment = MlflowClient(uri).get_experiment_by_name("quickstart-run")
    assert experiment.artifact_location == (out / "mlartifacts").resolve().as_uri()


WRITERS, RUNS, STEPS = 8, 2, 20


def _writer(uri: str, index: int) -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for r in range(RUNS):
        with MLflowTracker(uri, "writers", run_name=f"w{index}-r{r}", tags={"writer": str(index)}) as tracker:
            for step in range(STEPS):
                tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / STEPS}, step=step)


def test_eight_writers_on_one_sqlite_store_lose_no_metric(tmp_path):
    path = tmp_path / "mlflow.db"
    ensure_sqlite_database(path)
    uri = f"sqlite:///{path}"
    ensure_experiment(uri, "writers")  # as the sweep driver does before its trials start
    context = multiprocessing.get_context("fork")  # MLflow is imported already: no re-import per process
    processes = [context.Process(target=_writer, args=(uri, i)) for i in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
    assert [p.exitcode for p in processes] == [0] * WRITERS
    with sqlite3.connect(path) as conn:
        runs = conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        metrics = dict(conn.execute("SELECT key, COUNT(*) FROM metrics GROUP BY key").fetchall())
        per_run = {n for (n,) in conn.execute("SELECT COUNT(DISTINCT step) FROM metrics GROUP BY run_uuid, key")}
    assert runs == [("FINISHED", WRITERS * RUNS)]
    assert metrics == {"loss": WRITERS * RUNS * STEPS, "acc": WRITERS * RUNS * STEPS} and per_run == {STEPS}


def test_server_unreachable_mid_run_loses_no_metric_and_a_long_outage_fails_loudly(server, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries off: ours are tested
    monkeypatch.setenv(BACKOFF_ENV, "0.2")
    monkeypatch.setenv(RETRIES_ENV, "1")
    uri = f"http://127.0.0.1:{server.port}"
    tracker = MLflowTracker(uri, "outage")
    for step in range(10):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    server.off()
    with pytest.raises(TrackingError, match=rf"MLflow at {uri}: logging metrics \(step 10\) still failed"):
        tracker.log_metrics({"loss": 1.0 / 11}, step=10)  # the outage outlasts the retries: a loud failure
    monkeypatch.setenv(RETRIES_ENV, "10")  # 0.2, 0.4, ... 60 s: this outage is shorter
    errors: list[BaseException] = []

    def train() -> None:
        try:
            for step in range(10, 20):
                tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="puregen_dist.tracking.mlflow_tracker"):
        writer = threading.Thread(target=train)
        writer.start()
        time.sleep(2.0)
        assert writer.is_alive()  # waiting for the server, not dropping metrics
        server.on()
        writer.join(120)
    assert not writer.is_alive() and errors == []
    assert any("retry" in r.getMessage() for r in caplog.records)
    tracker.close()
    history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(20))  # every step, once
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw-6f1e2d", "RAY_AUTH_TOKEN": "ray-token-9a8b7c6d5e",
           "AWS_SECRET_ACCESS_KEY": "aws/Secret+Key0123456789"}
URI_PASSWORD = "uri-pw-31337x"


def test_a_run_logs_no_secret(server, tmp_path, monkeypatch):
    """`puregen-dist run` with credentials in its tracking URI, secrets in its environment (and one pasted into
    its config): no param, tag, run name or artifact of the run holds any of them."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    token_file = tmp_path / "ray_token"
    token_file.write_text("ray-file-token-4242")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    uri = f"http://puregen:{URI_PASSWORD}@127.0.0.1:{server.port}"
    assert main(["-q", "run", str(QUICKSTART), "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "classifier.epochs=1", "--set", "data.train_per_class=12", "--set", f"tracking.uri={uri}",
                 "--set", "tracking.experiment=secrets", "--set", f"name=run-{SECRETS['RAY_AUTH_TOKEN']}"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    texts = [run.info.run_name, *run.data.params.keys(), *run.data.params.values(), *run.data.tags.values()]
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".png" for p in files)
    blobs = [p.read_bytes() for p in files]
    for secret in (URI_PASSWORD, "ray-file-token-4242", *SECRETS.values()):
        assert not any(secret in text for text in texts), secret
        assert not any(secret.encode() in blob for blob in blobs), secret
    assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{server.port}"
