"""Resume after a killed sweep driver: the same command finishes only the missing cells, rebuilds nothing,
and leaves exactly one finished MLflow child run per cell. (Its own module: the driver runs in a subprocess
with its own local Ray.) The sweep's paths are relative (data root, outputs, store, Tune storage), as a user
writes them: Tune would run trials in their trial directory, and relative paths must keep the meaning they have
in the directory the command was started in."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_sweep import child_runs, sweep_file  # noqa: E402  (same directory)

from conftest import kill_processes
from puregen_dist.pipeline.store import ArtifactStore

pytestmark = pytest.mark.ray


def finished_children(db) -> int:
    """FINISHED runs with a cell_id tag, read with plain sqlite (an MlflowClient opened while the driver is
    still creating the database would race it on the schema migrations)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                                "WHERE runs.status = 'FINISHED' AND tags.key = 'cell_id'").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (the driver, the local Ray it started, its trial workers)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    kill_processes(family)
    proc.wait()



def write_digits_parquet(root: Path) -> None:
    """``root/train.parquet`` and ``root/test.parquet``: the digits of :func:`test_sweep.sweep_file` (12 training
    images per class, a quarter of the rest for testing) as PNG-encoded Hugging Face-style Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from puregen_dist.config.schema import DataConfig
    from puregen_dist.data.datasets import load_data

    root.mkdir()
    for split, data in zip(("train", "test"), load_data(DataConfig(train_per_class=12, test_fraction=0.25)),
                           strict=True):
        blobs = []
        for image in data.images:
            buffer = io.BytesIO()
            Image.fromarray(image[:, :, 0]).save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
        column = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array([""] * len(blobs))],
                                            ["bytes", "path"])
        pq.write_table(pa.table({"img": column, "label": data.labels}), root / f"{split}.parquet")


def relative_sweep_file(tmp_path: Path) -> Path:
    """:func:`test_sweep.sweep_file` with every path relative to ``tmp_path``, its digits read from Parquet."""
    write_digits_parquet(tmp_path / "data")
    path = sweep_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["base"].update(output_dir="out", data={"dataset": "parquet", "root": "data"})
    data["settings"].update(storage="tune", store="store")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_killed_driver_resumes_without_rebuilding(tmp_path):
    """The sweep CLI in a subprocess started in ``tmp_path`` (the sweep's paths are relative to it), killed after
    some trials finished; the same command then completes it."""
    path = relative_sweep_file(tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "puregen_dist", "-q", "sweep", path.name]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    db = tmp_path / "out" / "mlflow.db"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            time.sleep(2)
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended (rc {proc.returncode}) before it could be killed")
            if finished_children(db) >= 2:
                break
        else:
            pytest.fail("no trial finished in time")
    finally:
        kill_tree(proc)
    store = ArtifactStore(tmp_path / "store")
    built = {m["key"]: m["created"] for m in store.ls()}
    _, _, children = child_runs(tmp_path)
    done_before = {r.data.tags["cell_id"] for r in children if r.info.status == "FINISHED"}
    assert 2 <= len(done_before) < 8

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"trials: 8 ({8 - len(done_before)} to run, {len(done_before)} already finished)" in rerun.stdout
    _, _, children = child_runs(tmp_path)
    finished = [r.data.tags["cell_id"] for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 8 and len(set(finished)) == 8  # exactly one finished run per cell
    after = {m["key"]: m["created"] for m in store.ls()}
    assert all(after[key] == created for key, created in built.items())  # nothing rebuilt
    assert len(after) == 8  # per seed: poison set, clean set, and their purified sets
