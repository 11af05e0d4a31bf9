"""PureGen end to end on digits (issue #3 acceptance): tiny EBM and DDPM trained on a split of digits disjoint
from the classifier's, then a dirty-label blended BadNets backdoor (eps = 16/255, 10% budget) with and without
purification. Poison success is measured at trigger magnification m = 1 (the trigger as trained)."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from puregen_dist.attacks.badnets import BadNetsAttack, BadNetsConfig
from puregen_dist.cli import main
from puregen_dist.config.schema import DataConfig
from puregen_dist.data.datasets import load_data
from puregen_dist.data.transforms import to_sym
from puregen_dist.generative.purifiers import load_ebm

GENERATIVE_DATA = {"dataset": "digits", "train_partitions": 2, "train_partition": 1}
CLASSIFIER_DATA = {"dataset": "digits", "train_partitions": 2, "train_partition": 0}
EBM = {"arch": "sngan32", "nf": 16, "in_channels": 1, "image_size": 16}
EBM_TRAIN = {"epochs": 40, "batch_size": 64, "lr": 1.0e-3, "milestones": [30], "bank_size": 1000,
             "mcmc_steps": 20, "sample_grid": 16, "sample_steps": 20}
DDPM = {"size": "S", "in_channels": 1, "image_size": 16, "layers_per_block": 1}
DDPM_TRAIN = {"epochs": 20, "batch_size": 64, "lr": 1.0e-3, "warmup_steps": 20, "sample_grid": 0}
ATTACK = {"name": "badnets", "target_class": 0, "budget": 0.1, "label_mode": "dirty", "trigger": "blend",
          "eps": 16 / 255}
CLASSIFIER = {"name": "small_cnn", "epochs": 15, "batch_size": 64, "lr": 0.05, "milestones": [10],
              "crop_padding": 1, "flip": False}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("puregen_e2e")


@pytest.fixture(scope="module")
def ebm_dir(workdir) -> tuple[Path, float]:
    """Train the tiny EBM through the CLI (with MLflow tracking); returns (checkpoint, training seconds)."""
    config = write_yaml(workdir / "ebm.yaml", {"name": "tiny-ebm", "output": str(workdir / "ebm"),
                                               "data": GENERATIVE_DATA, "ebm": EBM, "train": EBM_TRAIN,
                                               "tracking": {"experiment": "ebm"}})
    start = time.perf_counter()
    assert main(["-q", "train-ebm", str(config)]) == 0
    return workdir / "ebm", time.perf_counter() - start


@pytest.fixture(scope="module")
def ddpm_dir(workdir) -> Path:
    config = write_yaml(workdir / "ddpm.yaml", {"name": "tiny-ddpm", "output": str(workdir / "ddpm"),
                                                "data": GENERATIVE_DATA, "ddpm": DDPM, "train": DDPM_TRAIN,
                                                "tracking": {"enabled": False}})
    assert main(["-q", "train-ddpm", str(config)]) == 0
    return workdir / "ddpm"


def run_experiment(workdir: Path, name: str, defense: dict) -> dict[str, float]:
    """`puregen-dist run` with the shared attack and classifier; returns the final MLflow metrics."""
    out = workdir / name
    config = write_yaml(workdir / f"{name}.yaml", {
        "name": name, "output_dir": str(out), "data": CLASSIFIER_DATA, "attack": ATTACK,
        "defense": defense, "classifier": CLASSIFIER, "eval": {"magnifications": [1.0]},
        "tracking": {"experiment": "e2e"}})
    assert main(["-q", "run", str(config)]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["e2e"])
    finally:
        mlflow.set_tracking_uri(None)
    return {k.removeprefix("metrics."): v for k, v in runs.iloc[0].items() if k.startswith("metrics.")}


@pytest.fixture(scope="module")
def undefended(workdir) -> dict[str, float]:
    return run_experiment(workdir, "undefended", {"name": "none"})


def test_tiny_ebm_separates_clean_from_noise_and_blended_trigger(ebm_dir):
    path, seconds = ebm_dir
    assert seconds < 180, f"the tiny EBM must train within 3 minutes, took {seconds:.0f}s"
    model, _ = load_ebm(path)
    _, test = load_data(DataConfig(**CLASSIFIER_DATA))
    blended = BadNetsAttack(BadNetsConfig(**{k: v for k, v in ATTACK.items() if k != "name"}, )).trigger_spec(
        test.shape)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = model(to_sym(test.images)).mean().item()
        noise = model(torch.rand(len(test), 1, 16, 16, generator=rng) * 2 - 1).mean().item()
        x = torch.clamp((to_sym(test.images) + 1) / 2 + torch.from_numpy(blended.trigger).permute(2, 0, 1), 0, 1)
        triggered = model(x * 2 - 1).mean().item()
    assert clean < noise and clean < triggered, (clean, noise, triggered)


def test_ebm_training_logged_per_epoch(ebm_dir):
    path, _ = ebm_dir
    mlflow.set_tracking_uri(f"sqlite:///{path.parent / 'mlflow.db'}")
    try:
        run = mlflow.search_runs(experiment_names=["ebm"]).iloc[0]
        history = mlflow.tracking.MlflowClient().get_metric_history(run["run_id"], "ebm_loss")
        artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run["run_id"], "images")]
    finally:
        mlflow.set_tracking_uri(None)
    assert len(history) == EBM_TRAIN["epochs"] and all(np.isfinite(m.value) for m in history)
    assert len(artifacts) == EBM_TRAIN["epochs"]  # one grid of short-run samples per epoch


def test_backdoor_succeeds_undefended(undefended):
    assert undefended["poison_success_m1"] >= 0.60
    assert undefended["nat_acc"] >= 0.90


@pytest.mark.parametrize("defense", ["puregen_ebm", "puregen_ddpm"])
def test_puregen_halves_poison_success_and_keeps_accuracy(workdir, ebm_dir, ddpm_dir, undefended, defense):
    models = {"puregen_ebm": {"ebm": str(ebm_dir[0])}, "puregen_ddpm": {"ddpm": str(ddpm_dir)}}[defense]
    defended = run_experiment(workdir, defense, {"name": defense, "batch_size": 64, **models})
    assert defended["poison_success_m1"] <= undefended["poison_success_m1"] / 2, (defended, undefended)
    assert defended["nat_acc"] >= undefended["nat_acc"] - 0.05, (defended, undefended)
