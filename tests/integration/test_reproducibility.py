"""The same sweep run twice on one machine, in fresh stores, gives bit-identical results (issue 16, item 1).

A small digits sweep that exercises every stage that makes numbers: an EBM trained from scratch (model stage), a
BadNets poison set (craft stage), PureGen-EBM Langevin purification through Ray Data (purify stage), classifier
training and evaluation in Ray Tune trials, metrics in MLflow. Run twice into two fresh directories (store, Tune
storage, MLflow database): the artifact keys, every committed file's sha256 (for Ray Data's purified sets: the
sha256 of their content in id order, since Ray Data's row order within a file follows block completion) and every
final metric of every cell must be equal. Wall-clock metrics (seconds, throughput) are the only ones excluded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from puregen_dist.cli import main
from puregen_dist.pipeline.store import ArtifactStore

pytestmark = pytest.mark.ray

mlflow = pytest.importorskip("mlflow")

TIMING = ("seconds", "per_second", "_time", "duration")


def sweep_file(root: Path) -> Path:
    """Digits, 2 defenses (none, PureGen-EBM with an EBM trained by the sweep) x 1 seed = 2 cells."""
    data = {
        "name": "repro",
        "base": {"output_dir": str(root / "out"),
                 "data": {"dataset": "digits", "train_per_class": 12, "test_fraction": 0.25},
                 "attack": {"name": "badnets", "target_class": 0, "budget": 0.1, "label_mode": "dirty"},
                 "classifier": {"name": "small_cnn", "epochs": 2, "batch_size": 32, "threads": 1,
                                "crop_padding": 1, "flip": True},
                 "eval": {"magnifications": [1.0, 3.0]}},
        "models": {"ebm": {"kind": "ebm", "recipe": "sweeps/ebm_digits_tiny.yaml",
                           "ebm": {"arch": "sngan32", "nf": 8, "in_channels": 1, "image_size": 16},
                           "train": {"epochs": 1, "bank_size": 100, "mcmc_steps": 5, "sample_grid": 4,
                                     "sample_steps": 5}}},
        "space": {"defense": {"grid": [{"name": "none"},
                                       {"name": "puregen_ebm", "ebm": "model:ebm", "langevin": {"steps": 5},
                                        "batch_size": 32}]}},
        "settings": {"seeds": [0], "trial_cpus": 1, "max_concurrent_trials": 2,
                     "storage": str(root / "tune"), "store": str(root / "store"),
                     "pipeline": {"actors": 1, "batch_size": 32, "cpu_tasks": 1, "craft": {"num_cpus": 1}}},
    }
    path = root / "repro.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def artifact_checksums(store_root: Path) -> dict[str, list[str]]:
    """``{key: sorted sha256 of its files}`` of every committed artifact, from the manifests the store wrote.
    A purified set is written by Ray Data, which names its files with random write ids and writes rows in block
    completion order: its checksum is that of its content sorted by image id (ids, labels, poison flags, pixels),
    which is how every reader sees it (``ArtifactStore.get_imageset``)."""
    store = ArtifactStore(store_root)
    sums = {}
    for manifest in store.ls():
        key = manifest["key"]
        if manifest["kind"] == "purified":
            data, poisoned = store.get_imageset(key)
            digest = hashlib.sha256()
            for array in (data.ids, data.labels, poisoned, data.images):
                digest.update(np.ascontiguousarray(array).tobytes())
            sums[key] = [digest.hexdigest()]
        else:
            sums[key] = sorted(entry["sha256"] for entry in store.manifest(key)["files"].values())
    return sums


def final_metrics(root: Path) -> dict[tuple[str, ...], dict[str, float]]:
    """``{(row, col, seed, classifier): {metric: value}}`` of every FINISHED trial run, wall-clock metrics left
    out (cell ids differ between the two runs: a cell's config holds its output directory)."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("repro")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {tuple(run.data.tags[t] for t in ("row", "col", "seed", "classifier")): {name: value for name, value in run.data.metrics.items()
                                       if not any(word in name for word in TIMING)}
            for run in runs if "cell_id" in run.data.tags and run.info.status == "FINISHED"}


def test_the_same_sweep_twice_in_fresh_stores_is_bit_identical(ray_session, tmp_path):
    results = []
    for attempt in ("first", "second"):
        root = tmp_path / attempt
        root.mkdir()
        assert main(["-q", "sweep", str(sweep_file(root))]) == 0
        results.append((artifact_checksums(root / "store"), final_metrics(root)))
    (files_a, metrics_a), (files_b, metrics_b) = results

    kinds = sorted(key.split("-")[0] for key in files_a)
    assert kinds == ["ebm", "poison", "poison", "purified", "purified"]  # every stage that makes numbers ran
    assert files_a.keys() == files_b.keys()  # the same content-addressed keys
    for key in files_a:
        assert files_a[key] == files_b[key], f"{key}: files differ between two identical runs"

    assert len(metrics_a) == 2 and metrics_a.keys() == metrics_b.keys()
    for cell, metrics in metrics_a.items():
        assert {"nat_acc", "poison_success_m1", "poison_success_m3"} <= metrics.keys(), sorted(metrics)
        assert metrics == metrics_b[cell], f"{cell}: metrics differ between two identical runs"
