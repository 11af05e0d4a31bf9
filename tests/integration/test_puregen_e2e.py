"""PureGen end to end on digits (issue #3 acceptance): tiny EBM and DDPM trained on a split of digits disjoint
from the classifier's, then a dirty-label sign-pattern BadNets backdoor (eps = 16/255, 10% budget) with and without
purification. Poison success is measured at trigger magnification m = 1 (the trigger as trained).

The generative models are the recipes' (sweeps/ebm_digits_tiny.yaml, ddpm_digits_tiny.yaml) at half their epochs,
scaled down through --set only (the EBM 20 of 40, its LR step at 15 of 30; the DDPM 10 of 20). Measured with them on
an idle 2-core CPU: undefended 100.0 % poison success / 96.9 % natural accuracy, PureGen-EBM 4.9 % / 95.1 %,
PureGen-DDPM 1.7 % / 95.1 % (the full recipes: README)."""

from __future__ import annotations

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

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"
RECIPE = yaml.safe_load((SWEEPS / "run_digits_puregen.yaml").read_text())
ATTACK = RECIPE["attack"]
EBM_EPOCHS, EBM_MILESTONE, DDPM_EPOCHS = 20, 15, 10  # half the recipes' epochs (module docstring)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("puregen_e2e")


@pytest.fixture(scope="module")
def ebm_dir(workdir) -> Path:
    """The recipe's tiny EBM at half its epochs, trained through the CLI with MLflow tracking."""
    assert main(["-q", "train-ebm", str(SWEEPS / "ebm_digits_tiny.yaml"), "--set", f"output={workdir / 'ebm'}",
                 "--set", "tracking.experiment=ebm", "--set", f"train.epochs={EBM_EPOCHS}",
                 "--set", f"train.milestones=[{EBM_MILESTONE}]"]) == 0
    return workdir / "ebm"


@pytest.fixture(scope="module")
def ddpm_dir(workdir) -> Path:
    """The recipe's tiny DDPM at half its epochs (its cosine LR decays over those 10), untracked and without its
    sample grid (75 reverse steps of 16 images every `sample_every` epochs: nothing records it here; unit-tested
    in test_ddpm.py). The grid has its own noise stream: leaving it out does not change the weights."""
    assert main(["-q", "train-ddpm", str(SWEEPS / "ddpm_digits_tiny.yaml"), "--set", f"output={workdir / 'ddpm'}",
                 "--set", "tracking.enabled=false", "--set", "train.sample_grid=0",
                 "--set", f"train.epochs={DDPM_EPOCHS}"]) == 0
    return workdir / "ddpm"


def run_experiment(workdir: Path, name: str, *overrides: str) -> dict[str, float]:
    """`puregen-dist run sweeps/run_digits_puregen.yaml` with overrides; returns the final MLflow metrics."""
    out = workdir / name
    assert main(["-q", "run", str(SWEEPS / "run_digits_puregen.yaml"), "--set", f"output_dir={out}",
                 "--set", "tracking.experiment=e2e", "--set", "eval.magnifications=[1.0]", *overrides]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["e2e"])
    finally:
        mlflow.set_tracking_uri(None)
    return {k.removeprefix("metrics."): v for k, v in runs.iloc[0].items() if k.startswith("metrics.")}


@pytest.fixture(scope="module")
def undefended(workdir) -> dict[str, float]:
    return run_experiment(workdir, "undefended", "--set", "defense.name=none")


def test_tiny_ebm_separates_clean_from_noise_and_sign_trigger(ebm_dir):
    model, _ = load_ebm(ebm_dir)  # 20 epochs of nf=16: about 35 s on an idle 2-core CPU
    _, test = load_data(DataConfig(**RECIPE["data"]))
    sign = BadNetsAttack(BadNetsConfig(**ATTACK)).trigger_spec(test.shape)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = model(to_sym(test.images)).mean().item()
        noise = model(torch.rand(len(test), 1, 16, 16, generator=rng) * 2 - 1).mean().item()
        x = torch.clamp((to_sym(test.images) + 1) / 2 + torch.from_numpy(sign.trigger).permute(2, 0, 1), 0, 1)
        triggered = model(x * 2 - 1).mean().item()
    assert clean < noise and clean < triggered, (clean, noise, triggered)


def test_ebm_training_logged_per_epoch(ebm_dir):
    mlflow.set_tracking_uri(f"sqlite:///{ebm_dir.parent / 'mlflow.db'}")
    try:
        run = mlflow.search_runs(experiment_names=["ebm"]).iloc[0]
        history = mlflow.tracking.MlflowClient().get_metric_history(run["run_id"], "ebm_loss")
        artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run["run_id"], "images")]
    finally:
        mlflow.set_tracking_uri(None)
    assert len(history) == EBM_EPOCHS and all(np.isfinite(m.value) for m in history)
    assert len(artifacts) == EBM_EPOCHS  # one grid of short-run samples per epoch


def test_backdoor_succeeds_undefended(undefended):
    assert undefended["poison_success_m1"] >= 0.60
    assert undefended["nat_acc"] >= 0.90


@pytest.mark.parametrize("defense", ["puregen_ebm", "puregen_ddpm"])
def test_puregen_halves_poison_success_and_keeps_accuracy(workdir, ebm_dir, ddpm_dir, undefended, defense):
    model = {"puregen_ebm": f"defense.ebm={ebm_dir}", "puregen_ddpm": f"defense.ddpm={ddpm_dir}"}[defense]
    defended = run_experiment(workdir, defense, "--set", f"defense.name={defense}", "--set", model,
                              "--set", "defense.batch_size=64")
    assert defended["poison_success_m1"] <= undefended["poison_success_m1"] / 2, (defended, undefended)
    assert defended["nat_acc"] >= undefended["nat_acc"] - 0.05, (defended, undefended)
