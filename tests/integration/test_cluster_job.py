"""`ray job submit` on a real two-node Ray (issue 13), as docs/cluster.md tells a user to do it.

A head (`ray start --head`, token authentication on, one CPU) and a second node that alone offers the custom
resource ``puregen_node`` run on this machine; an MLflow tracking server runs on 127.0.0.1 (cluster/mlflow/server.sh).
A small digits sweep whose trials and purifier actors ask for ``puregen_node`` is submitted with
``cluster/submit.sh`` (the repository as the working directory, ``PUREGEN_ROOT`` and ``MLFLOW_TRACKING_URI`` passed
to the job). Checked: the runs, metrics and report artifacts in the server; trials and purifier actors on the second
node; the code revision recorded; nothing written into Ray's working-dir cache; a job with working-dir-relative
outputs refused before any work; a client without the token refused; a job stopped half-way and resubmitted runs
only the missing cells. Every process the module starts is stopped, even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import kill_processes

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
NODE_RESOURCE = "puregen_node"
SWEEP = {
    "name": "cluster-e2e",
    "base": {
        "seed": 0,
        "output_dir": "outputs/cluster-e2e",  # relative: resolves under $PUREGEN_ROOT in the job
        "data": {"dataset": "digits", "train_per_class": 12, "test_fraction": 0.25},
        "attack": {"name": "badnets", "target_class": 0, "budget": 0.1, "label_mode": "dirty"},
        "defense": {"name": "puregen_ebm", "ebm": "model:ebm", "langevin": {"steps": 5}, "batch_size": 32},
        "classifier": {"name": "small_cnn", "epochs": 1, "batch_size": 32, "threads": 1, "crop_padding": 1,
                       "flip": False},
        "eval": {"magnifications": [1.0]},
    },
    "models": {"ebm": {"kind": "ebm", "recipe": "sweeps/ebm_digits_tiny.yaml",
                       "ebm": {"arch": "sngan32", "nf": 8, "in_channels": 1, "image_size": 16},
                       "train": {"epochs": 1, "bank_size": 100, "mcmc_steps": 5, "sample_grid": 4,
                                 "sample_steps": 5}}},
    "space": {"defense.langevin.steps": [5]},
    "settings": {"seeds": [0, 1], "trial_cpus": 1, "trial_resources": {NODE_RESOURCE: 1}, "max_concurrent_trials": 1,
                 "storage": "outputs/cluster-e2e/tune", "store": "outputs/cluster-e2e/store",
                 "pipeline": {"actors": 1, "batch_size": 32, "num_cpus_per_actor": 0.5, "cpu_tasks": 1,
                              "resources_per_actor": {NODE_RESOURCE: 1}, "craft": {"num_cpus": 1}}},
}


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]
    dashboard: str
    mlflow: str
    worker_node_id: str
    sweep: Path

    @property
    def root(self) -> Path:
        return self.tmp / "shared"

    def submit(self, *options: str, sweep_args: tuple[str, ...] = (), root: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """``cluster/submit.sh [options] -- puregen-dist -q sweep SWEEP [sweep_args]`` as the docs give it."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard, "MLFLOW_TRACKING_URI": self.mlflow}
        if root:
            env["PUREGEN_ROOT"] = str(self.root)
        command = ["bash", str(REPO / "cluster" / "submit.sh"), *options, "--", "puregen-dist", "-q", "sweep",
                   str(self.sweep), *sweep_args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    def ray(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args, "--address", self.dashboard], env=self.env, capture_output=True,
                              text=True, timeout=120)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.mlflow)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ports() -> list[str]:
    """Every port a node listens on, free ones (another Ray on this machine holds the defaults)."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for name, port in zip(names, _free_ports(len(names)), strict=True) for arg in (name, str(port))]


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def _stop_everything(tmp: Path, popens: list[subprocess.Popen]) -> None:
    """SIGKILL the Ray processes of this cluster (their command lines name its temp dir) with all their
    descendants (workers and agents rename themselves), and the MLflow server's process group."""
    import psutil

    family = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(tmp) in " ".join(proc.info["cmdline"] or ()):
            try:
                family += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    for popen in popens:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_processes(family)


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="pgc-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PUREGEN_ROOT", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1")
    gcs, dashboard, client_port, mlflow_port = _free_ports(4)
    popens: list[subprocess.Popen] = []
    # Each node its own temp dir, as on separate machines: nodes that share one unpack the job's package into
    # the same working-dir cache, and the second unpacking deletes the directory the driver runs in.
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_port),
                        "--include-dashboard", "true", "--num-cpus", "1", "--temp-dir", str(tmp / "ray-head"), *common,
                        *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2",
                        "--resources", json.dumps({NODE_RESOURCE: 4}), "--temp-dir", str(tmp / "ray-worker"), *common,
                        *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=180)
        server_env = {**env, "MLFLOW_PORT": str(mlflow_port),
                      "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp / 'mlflow-server' / 'mlflow.db'}",
                      "MLFLOW_ARTIFACTS_DESTINATION": str(tmp / "mlflow-server" / "artifacts")}
        popens.append(subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow" / "server.sh")], env=server_env,
                                       cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True))
        mlflow = f"http://127.0.0.1:{mlflow_port}"
        _wait_http(f"{mlflow}/health")
        nodes = json.loads(subprocess.run([RAY, "list", "nodes", "--address", f"http://127.0.0.1:{dashboard}",
                                           "--format", "json", "--detail"], env=env, check=True,
                                          capture_output=True, text=True, timeout=120).stdout)
        worker = [n["node_id"] for n in nodes if NODE_RESOURCE in (n.get("resources_total") or {})]
        assert len(nodes) == 2 and len(worker) == 1, nodes
        sweep = tmp / "sweep.yaml"
        sweep.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
        yield Cluster(tmp, env, f"http://127.0.0.1:{dashboard}", mlflow, worker[0], sweep)
    finally:
        _stop_everything(tmp, popens)
        shutil.rmtree(tmp, ignore_errors=True)


def _children(client, experiment: str, parent_id: str | None = None) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return [r for r in runs if "cell_id" in r.data.tags
            and (parent_id is None or r.data.tags.get("mlflow.parentRunId") == parent_id)]


def _parents(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.data.tags.get("role") == "sweep"]


def test_a_client_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    listed = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode != 0
    assert "authentication" in (listed.stdout + listed.stderr).lower()


def test_outputs_in_the_working_dir_cache_are_refused_before_any_work(cluster):
    result = cluster.submit("--submission-id", "e2e-refused", root=False, sweep_args=("--set", "name=e2e-refused"))
    assert result.returncode != 0
    logs = cluster.ray("job", "logs", "e2e-refused").stdout
    assert "working-dir cache" in logs and "PUREGEN_ROOT" in logs and "settings.store" in logs, logs[-2000:]
    assert "Traceback" not in logs  # one clear paragraph, exit 2
    assert cluster.client().get_experiment_by_name("e2e-refused") is None  # nothing tracked
    cache = list(cluster.tmp.glob("ray-*/session_*/runtime_resources/working_dir_files/*"))
    assert cache and not [p for c in cache for p in (c / "outputs", c / "mlruns", c / "mlflow.db") if p.exists()]


def test_a_sweep_job_runs_its_trials_and_actors_on_the_second_node(cluster):
    result = cluster.submit("--submission-id", "e2e-1")
    logs = cluster.ray("job", "logs", "e2e-1").stdout
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + logs[-3000:]
    assert "puregen_ebm" in logs and "the 2 cells of" in logs  # the report, and what it covers

    client = cluster.client()
    (parent,) = _parents(client, "cluster-e2e")
    children = _children(client, "cluster-e2e", parent.info.run_id)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert all({"nat_acc", "poison_success_m1"} <= set(r.data.metrics) for r in children)
    assert {r.data.tags["ray_node_id"] for r in children} == {cluster.worker_node_id}
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if revision:
        assert parent.data.tags["git_revision"].startswith(revision)
    assert parent.data.tags.get("ray_job_id")
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in report
    assert "puregen_ebm" in Path(client.download_artifacts(parent.info.run_id, "report/report.md",
                                                           str(cluster.tmp))).read_text()

    actors = json.loads(cluster.ray("list", "actors", "--format", "json", "--detail", "--limit", "10000").stdout)
    purifiers = [a for a in actors if "PurifierActor" in (a.get("class_name") or "")]
    assert purifiers and {a["node_id"] for a in purifiers} == {cluster.worker_node_id}

    published = subprocess.run(["puregen-dist", "-q", "report", "cluster-e2e", "--tracking-uri", cluster.mlflow,
                                "--report-dir", str(cluster.tmp / "published")], capture_output=True, text=True,
                               timeout=300, env={**cluster.env, "MLFLOW_TRACKING_URI": cluster.mlflow})
    assert published.returncode == 0 and "puregen_ebm" in published.stdout, published.stderr[-2000:]

    store = cluster.root / "outputs" / "cluster-e2e" / "store"
    kinds = {p.name.split("-")[0] for p in store.iterdir() if p.is_dir()}
    assert {"ebm", "poison", "purified"} <= kinds  # the shared store, not the working-dir cache
    cache = list(cluster.tmp.glob("ray-*/session_*/runtime_resources/working_dir_files/*"))
    assert not [p for c in cache for p in (c / "outputs", c / "mlruns", c / "mlflow.db") if p.exists()]


def test_a_stopped_job_resubmitted_runs_only_the_missing_cells(cluster):
    # 8 new cells on the seeds of e2e-1 (four learning rates x two seeds): their poison and purified sets are
    # cached, so each job only runs trials. Trials reuse their actors and take about two seconds each: enough
    # cells that the stop lands mid-sweep.
    if not _children(cluster.client(), "cluster-e2e"):  # run alone (-k): the first job's two cells first
        assert cluster.submit("--submission-id", "e2e-base").returncode == 0
    old = {r.data.tags["cell_id"] for r in _children(cluster.client(), "cluster-e2e")}
    assert len(old) == 2
    more = ("--set", "space={classifier.lr: [0.02, 0.03, 0.04, 0.06]}")
    assert cluster.submit("--submission-id", "e2e-2", "--no-wait", sweep_args=more).returncode == 0
    client = cluster.client()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if {r.data.tags["cell_id"] for r in _children(client, "cluster-e2e") if r.info.status == "FINISHED"} - old:
            break
        assert "SUCCEEDED" not in cluster.ray("job", "status", "e2e-2").stdout
    else:
        pytest.fail("no trial of the second job finished in time")
    assert cluster.ray("job", "stop", "e2e-2").returncode == 0
    done = {r.data.tags["cell_id"] for r in _children(client, "cluster-e2e") if r.info.status == "FINISHED"} - old
    cells = 8
    assert 1 <= len(done) < cells

    result = cluster.submit("--submission-id", "e2e-3", sweep_args=more)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    logs = cluster.ray("job", "logs", "e2e-3").stdout
    assert f"trials: {cells} ({cells - len(done)} to run, {len(done)} already finished)" in logs
    assert "poison sets: 2 (0 to build, 2 cached)" in logs  # only trials ran
    resumed = _parents(client, "cluster-e2e")[-1]
    assert resumed.data.metrics["trials_run"] == cells - len(done)
    finished = [r.data.tags["cell_id"] for r in _children(client, "cluster-e2e")
                if r.info.status == "FINISHED" and r.data.tags["cell_id"] not in old]
    assert len(finished) == len(set(finished)) == cells  # every cell once: nothing ran twice
