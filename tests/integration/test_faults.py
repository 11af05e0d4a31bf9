"""Fault injection (issue 16, deliverable 2), small and on CPU: each fault is injected for real (SIGKILL of a Ray
worker, of a purifier actor, of every process of a Ray node; bytes flipped in a committed artifact; a file-size
limit hit during a write) and the test asserts what was kept: run statuses, ids, row counts, checksums.

- a trial's worker SIGKILLed mid-training -> Tune retries the cell; exactly one FINISHED MLflow run, the dead
  attempt's run ended KILLED (not left RUNNING);
- a purifier actor SIGKILLed mid-purification -> Ray Data restarts it and retries its batch: every id once, bytes
  equal to an un-faulted run;
- a worker node killed mid-sweep (head + one worker node started with ``ray start``) -> the trials that ran there
  are retried on the head and the sweep completes;
- a committed artifact corrupted on disk -> detected by its SHA-256, set aside, rebuilt bit-identical by the next
  sweep before any trial reads it;
- the disk filling during an artifact write -> StoreSpaceError naming the file, nothing under the key, no
  staging leftovers.

The killed sweep driver (re-running resumes) is tests/integration/test_sweep_resume.py. Every process these tests
start is stopped by pid (never `ray stop`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_cluster_job import RAY, _free_ports, _node_ports, _stop_everything  # noqa: E402  (same directory)
from test_sweep import child_runs, sweep_file  # noqa: E402  (same directory)

from conftest import kill_processes, make_imageset
from puregen_dist.pipeline.store import ArtifactStore

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
FAULT_NODE = "fault_node"
"""Custom resource of the worker node that the node-kill test kills (trials do not ask for it)."""


# ------------------------------------------------------------------------------------------ helpers


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def announcer(pidfile: str):
    """A function that announces the calling process in ``pidfile`` (atomically: the killer never reads half a
    file). Nested, so that Ray pickles it by value (workers cannot import this test module)."""

    def announce() -> None:
        tmp = f"{pidfile}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            json.dump({"pid": os.getpid()}, handle)
        os.replace(tmp, pidfile)

    return announce


class Killer(threading.Thread):
    """SIGKILLs the process announced in ``pidfile`` as soon as it appears, after checking that it descends
    from this test process (a Ray worker of the local Ray this process started): nothing else is touched."""

    def __init__(self, pidfile: Path, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.pidfile, self.timeout, self.killed, self.error = pidfile, timeout, [], None

    def run(self) -> None:
        import psutil

        try:
            wait_for(self.pidfile.exists, self.timeout, f"a process announcing itself in {self.pidfile}")
            pid = json.loads(self.pidfile.read_text())["pid"]
            ours = {p.pid: p for p in psutil.Process(os.getpid()).children(recursive=True)}
            assert pid in ours, f"pid {pid} is not a descendant of the test process"
            kill_processes([ours[pid]])
            self.killed.append(pid)
        except BaseException as exc:  # reported by the test
            self.error = exc


def statuses_by_cell(children) -> dict[str, list[str]]:
    by_cell: dict[str, list[str]] = {}
    for run in children:
        by_cell.setdefault(run.data.tags["cell_id"], []).append(run.info.status)
    return {cell: sorted(statuses) for cell, statuses in by_cell.items()}


# ------------------------------------------------------------------------------------------ a node killed


DRIVER = """
import json, os, sys, time
from puregen_dist.sweep.runner import run_sweep
from puregen_dist.sweep.spec import load_sweep
from puregen_dist.sweep.trial import run_trial

PIDS = sys.argv[2]

def trainable(config):
    # On the node with the fault_node resource, announce the trial mid-training (after its first epoch was logged)
    # and wait there until the test kills the node; anywhere else (the retry on the head) train normally.
    import ray
    import ray.tune
    node = ray.get_runtime_context().get_node_id()
    if any(n["NodeID"] == node and "fault_node" in n["Resources"] for n in ray.nodes() if n["Alive"]):
        def report(metrics, **kwargs):
            path = os.path.join(PIDS, str(os.getpid()))
            with open(path + ".tmp", "w") as handle:
                json.dump({"pid": os.getpid(), "node": node, "cell": config["trial"]["cell_id"]}, handle)
            os.replace(path + ".tmp", path)
            time.sleep(600)
        ray.tune.report = report
    run_trial(config)

outcome = run_sweep(load_sweep(sys.argv[1]), trainable=trainable, echo=print)
print("FAILED CELLS", outcome.trials_failed)
sys.exit(1 if outcome.trials_failed else 0)
"""


def test_a_worker_node_killed_mid_sweep_the_sweep_completes_on_the_head(tmp_path):
    """Head and a worker node (resource fault_node), 1 CPU each, from `ray start` with token auth, as in
    test_cluster_job.py. The sweep driver (a subprocess joining the cluster) runs 2 one-CPU cells, so one trial
    runs on each node; the worker node's trial stops mid-training (its first epoch logged), then every process of
    that node is SIGKILLed (raylet, agents, workers). The head's GCS marks the node dead, Tune retries the lost
    trial on the head (max_failures=1)."""
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="pgf-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PUREGEN_ROOT", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0",
               # the GCS declares a silent node dead after 3 failed health checks 0.5 s apart (default 5 x 3 s)
               RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="500",
               RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
    gcs, dashboard, client_port = _free_ports(3)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    driver: subprocess.Popen | None = None
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(gcs), "--include-dashboard", "false",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_port),
                        "--num-cpus", "1", "--temp-dir", str(tmp / "ray-head"), *common, *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                        "--resources", json.dumps({FAULT_NODE: 1}), "--temp-dir", str(tmp / "ray-worker"),
                        *common, *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=180)
        path = sweep_file(tmp_path, "nodes", max_concurrent_trials=2, max_failures=1)
        data = yaml.safe_load(path.read_text())
        data["space"] = {"classifier.batch_size": [32, 16], "classifier.name": ["small_cnn"],
                         "defense": {"grid": [{"name": "none"}]}}
        data["settings"]["seeds"] = [0]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        pids = tmp_path / "pids"
        pids.mkdir()
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        driver = subprocess.Popen([sys.executable, str(script), str(path), str(pids)], cwd=tmp_path,
                                  env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        wait_for(lambda: list(pids.glob("[0-9]*[0-9]")) or driver.poll() is not None, 300,
                 "a trial running on the worker node")
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        stuck = [json.loads(p.read_text()) for p in pids.glob("[0-9]*[0-9]")]

        # every process of the worker node: those naming its temp dir (raylet, agents) and their descendants
        node = []
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp / "ray-worker") in " ".join(proc.info["cmdline"] or ()):
                try:
                    node += [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        assert {s["pid"] for s in stuck} <= {p.pid for p in node}  # the stuck trials ran on that node
        kill_processes(node)

        out, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, out[-4000:]
    finally:
        if driver is not None and driver.poll() is None:
            kill_processes([psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)])
        _stop_everything(tmp, [])
        shutil.rmtree(tmp, ignore_errors=True)

    _, parents, children = child_runs(tmp_path, "nodes")
    by_cell = statuses_by_cell(children)
    assert len(by_cell) == 2 and all(s.count("FINISHED") == 1 for s in by_cell.values()), by_cell
    assert not [r for r in children if r.info.status == "RUNNING"]
    lost_node = stuck[0]["node"]
    for cell in {s["cell"] for s in stuck}:  # each lost attempt: KILLED, on the dead node; its retry elsewhere
        runs = [r for r in children if r.data.tags["cell_id"] == cell]
        (killed,) = [r for r in runs if r.info.status == "KILLED"]
        (finished,) = [r for r in runs if r.info.status == "FINISHED"]
        assert killed.data.tags["ray_node_id"] == lost_node != finished.data.tags["ray_node_id"]
        assert killed.data.tags["superseded_by"] == finished.info.run_id
    assert parents[0].info.status == "FINISHED"


# ------------------------------------------------------------------------------------------ a trial worker killed


def killed_once_trainable(victim: str, pidfile: str):
    """``run_trial`` whose first attempt at cell ``victim`` announces its worker process after the first epoch was
    logged to MLflow (mid-training: the run is open) and then waits to be killed."""
    from puregen_dist.sweep.trial import run_trial

    announce = announcer(pidfile)

    def trainable(config):
        if config["trial"]["cell_id"] == victim and not os.path.exists(pidfile):
            import ray.tune

            def report(metrics, **kwargs):
                announce()
                time.sleep(600)
            ray.tune.report = report  # this worker process only; it does not survive the kill
        run_trial(config)

    return trainable


@pytest.fixture(scope="module")
def killed_trial_sweep(ray_session, tmp_path_factory):
    """A one-cell sweep (badnets, no defense, small_cnn, seed 0) whose trial worker is SIGKILLed mid-training
    once; (tmp dir, sweep file, overrides, the cell, outcome, killer)."""
    from puregen_dist.sweep.runner import run_sweep
    from puregen_dist.sweep.spec import load_sweep

    tmp_path = tmp_path_factory.mktemp("killed_trial")
    path = sweep_file(tmp_path, "faults")
    overrides = ["space.classifier.name=[small_cnn]", "space.defense.grid=[{name: none}]", "settings.seeds=[0]"]
    sweep = load_sweep(path, overrides)
    (victim,) = [c.cell_id for c in sweep.cells]
    pidfile = tmp_path / "victim.pid"
    killer = Killer(pidfile)
    killer.start()
    outcome = run_sweep(sweep, trainable=killed_once_trainable(victim, str(pidfile)), echo=lambda line: None)
    killer.join(5)
    return tmp_path, path, overrides, victim, outcome, killer


def test_a_trial_worker_killed_mid_training_is_retried_once_finished(killed_trial_sweep):
    tmp_path, _, _, victim, outcome, killer = killed_trial_sweep
    assert killer.error is None and len(killer.killed) == 1
    assert outcome.trials_failed == []
    _, parents, children = child_runs(tmp_path, "faults")
    assert statuses_by_cell(children) == {victim: ["FINISHED", "KILLED"]}
    (killed,) = [r for r in children if r.info.status == "KILLED"]
    (retry,) = [r for r in children if r.data.tags["cell_id"] == victim and r.info.status == "FINISHED"]
    assert "test_acc" in killed.data.metrics and "nat_acc" not in killed.data.metrics  # died mid-training
    assert killed.data.tags["superseded_by"] == retry.info.run_id and retry.data.tags["retry_of"] == killed.info.run_id
    assert "attempt lost" in killed.data.tags["error"]
    assert parents[0].info.status == "FINISHED"
    # the report counts the cell once (the killed attempt is not a run of it), with the retry's numbers
    (row,) = csv.DictReader(io.StringIO((Path(outcome.report_dir) / "report.csv").read_text()))
    assert row["n_runs"] == "1" and row["nat_acc_n"] == "1"
    assert float(row["nat_acc_mean"]) == pytest.approx(retry.data.metrics["nat_acc"])


# ------------------------------------------------------------------------------------------ a corrupt artifact


def test_a_corrupt_artifact_is_detected_set_aside_and_rebuilt_before_use(killed_trial_sweep, caplog):
    """Bytes flipped in the committed poison set's Parquet file (same size, so only the checksum tells). The next
    sweep (new cells that read that poison set) plans it as a build, sets the corrupt copy aside, rebuilds it with
    the same SHA-256, and its trials finish on the rebuilt set."""
    from puregen_dist.sweep.runner import run_sweep
    from puregen_dist.sweep.spec import load_sweep

    tmp_path, path, overrides, *_ = killed_trial_sweep
    store = ArtifactStore(tmp_path / "store")
    (poison,) = store.ls()
    key, files = poison["key"], poison["files"]
    target = tmp_path / "store" / key / "images.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))

    lines: list[str] = []
    outcome = run_sweep(load_sweep(path, [*overrides, "base.classifier.epochs=2"]), echo=lines.append)
    plan = "\n".join(lines)
    assert "poison sets: 1 (1 to build, 0 cached)" in plan and "trials: 1 (1 to run" in plan
    assert outcome.trials_failed == []
    (rebuilt,) = store.ls()
    assert rebuilt["key"] == key and rebuilt["files"] == files  # bit-identical to the original
    assert store.check(key) is None
    (aside,) = (tmp_path / "store" / ".corrupt").iterdir()
    assert aside.name.startswith(key) and (aside / "images.parquet").read_bytes() == bytes(data)
    _, _, children = child_runs(tmp_path, "faults")
    epochs2 = [r for r in children if r.data.params["classifier.epochs"] == "2"]
    assert [r.info.status for r in epochs2] == ["FINISHED"]
    assert {r.data.tags["artifact.poison"] for r in epochs2} == {key}
    assert any(key in r.getMessage() and "images.parquet is corrupt" in r.getMessage() for r in caplog.records)


def test_runs_of_dead_attempts_that_were_not_retried_are_ended_killed(killed_trial_sweep):
    """What a sweep driver can call once its trials are over (max_failures exhausted): the dead attempts' runs
    under its parent run end KILLED; other parents' runs and ended runs are left alone. (In the fixture's MLflow
    database, another experiment.)"""
    from mlflow.tracking import MlflowClient

    from puregen_dist.sweep.trial import close_orphaned_runs
    from puregen_dist.tracking.mlflow_tracker import MLflowTracker

    uri = f"sqlite:///{killed_trial_sweep[0] / 'out' / 'mlflow.db'}"
    parent, other = (MLflowTracker(uri, "orphans", run_name=name) for name in ("parent", "other"))
    dead, done, elsewhere = (MLflowTracker(uri, "orphans", parent_run_id=p.run_id, tags={"cell_id": c})
                             for p, c in ((parent, "a"), (parent, "b"), (other, "c")))
    done.close("FINISHED")
    assert close_orphaned_runs(uri, "orphans", parent.run_id) == [dead.run_id]
    client = MlflowClient(uri)
    status = {t.run_id: client.get_run(t.run_id).info.status for t in (dead, done, elsewhere)}
    assert status == {dead.run_id: "KILLED", done.run_id: "FINISHED", elsewhere.run_id: "RUNNING"}
    assert close_orphaned_runs(uri, "orphans", parent.run_id) == []


# ------------------------------------------------------------------------------------------ a purifier actor killed


def hang_once_actor(pidfile: str):
    """A PurifierActor that, on its second batch of the first actor's life, announces itself and waits to be
    killed. Defined in a function so that Ray pickles the class by value."""
    from puregen_dist.pipeline.actors import PurifierActor

    announce = announcer(pidfile)

    class HangOnceActor(PurifierActor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and not os.path.exists(pidfile):
                announce()
                time.sleep(600)
            return super().__call__(batch)

    return HangOnceActor


def test_a_purifier_actor_killed_mid_purification_loses_and_duplicates_nothing(ray_session, tiny_checkpoints,
                                                                                tmp_path, monkeypatch):
    from puregen_dist.config.generative import LangevinConfig
    from puregen_dist.data.io import parquet_files, resolve_path, write_imageset
    from puregen_dist.defenses.puregen import PureGenDefense, PureGenEBMConfig
    from puregen_dist.pipeline import purify as purify_module
    from puregen_dist.pipeline.purify import RayPurifyConfig, purify_parquet, read_purified

    data = make_imageset(n=48, size=16, channels=1, seed=5)
    write_imageset(data, tmp_path / "input" / "train.parquet", poisoned_ids=data.ids[::7])
    cfg = PureGenEBMConfig(ebm=str(tiny_checkpoints[1][0]), langevin=LangevinConfig(steps=3), device="cpu")
    ray_cfg = RayPurifyConfig(actors=1, batch_size=8, num_cpus_per_actor=1)

    pidfile = tmp_path / "actor.pid"
    monkeypatch.setattr(purify_module, "PurifierActor", hang_once_actor(str(pidfile)))
    killer = Killer(pidfile)
    killer.start()
    stats = purify_parquet(str(tmp_path / "input"), str(tmp_path / "out"), cfg, seed=2, ray_cfg=ray_cfg)
    killer.join(5)
    assert killer.error is None and len(killer.killed) == 1  # an actor died mid-batch
    fs, root = resolve_path(str(tmp_path / "out"))
    rows = sum(purify_module._read_footer(fs, f)[1] for f in parquet_files(fs, root))
    assert rows == stats.images == len(data)  # no row lost or written twice
    out, flags = read_purified(str(tmp_path / "out"))  # refuses duplicate ids
    np.testing.assert_array_equal(out.ids, data.ids)  # every id exactly once
    np.testing.assert_array_equal(out.labels, data.labels)
    np.testing.assert_array_equal(flags, np.isin(data.ids, data.ids[::7]))
    # bit-equal to an un-faulted run (in process: equal to an un-faulted Ray run, tests/integration/test_ray_purify.py)
    np.testing.assert_array_equal(out.images, PureGenDefense(cfg).apply(data, seed=2).images)
    assert not np.array_equal(out.images, data.images)


# ------------------------------------------------------------------------------------------ the disk filling


def test_a_full_disk_during_an_artifact_write_leaves_nothing(tmp_path):
    """A real EFBIG: the write runs in a child process under RLIMIT_FSIZE = 64 KiB with SIGXFSZ ignored, storing an
    image set of ~150 KB of incompressible pixels. (ENOSPC and the manifest write: tests/unit/pipeline/test_store.py.)"""
    script = textwrap.dedent(f"""
        import json, resource, signal
        from conftest import make_imageset
        from puregen_dist.pipeline.store import ArtifactStore, StoreSpaceError, artifact_key
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = ArtifactStore({str(tmp_path / "store")!r})
        data = make_imageset(n=200, size=16, channels=3, seed=1)
        key = artifact_key("poison", {{"n": 200}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            store.put_imageset(key, data, kind="poison", config={{"n": 200}})
            print(json.dumps({{"stored": True}}))
        except StoreSpaceError as exc:
            print(json.dumps({{"stored": False, "key": key, "error": str(exc), "exit2": isinstance(exc, ValueError)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stored"] is False and result["exit2"]
    assert "file too large" in result["error"] and "images.parquet" in result["error"]
    assert result["key"] in result["error"] and "Nothing was stored" in result["error"]
    store = ArtifactStore(tmp_path / "store")
    assert not store.exists(result["key"]) and store.ls() == []
    leftovers = [p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*")]
    assert leftovers == [".tmp"], leftovers  # the empty staging root only
