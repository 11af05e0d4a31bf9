"""The generative commands through the CLI on tiny checkpoints: purify (Parquet out, throughput), diagnose
(PNG + CSV), show-config for every job kind, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml
from PIL import Image

from puregen_dist.cli import main
from puregen_dist.data.io import read_imageset
from puregen_dist.diagnose import survival_rows_from_metrics
from puregen_dist.plots import survival_markdown
from puregen_dist.tracking.reader import latest_metric_histories

DATA = {"dataset": "digits", "train_per_class": 3}
ATTACK = {"name": "badnets", "budget": 0.2, "trigger": "sign"}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_purify_writes_a_parquet_image_set_and_reports_throughput(tmp_path, tiny_checkpoints, capsys):
    ebm, _ = tiny_checkpoints[1]
    out = tmp_path / "purified.parquet"
    config = write(tmp_path, "purify.yaml", {
        "output": str(out), "data": DATA, "attack": ATTACK,
        "defense": {"name": "puregen_ebm", "ebm": str(ebm), "langevin": {"steps": 3}, "batch_size": 8}})
    assert main(["-q", "purify", str(config), "--no-ray"]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "s/image/device" in printed and str(out) in printed
    data, poisoned = read_imageset(out)
    assert len(data) == 30 and data.shape == (16, 16, 1) and np.array_equal(data.ids, np.sort(data.ids))
    assert poisoned.sum() == 6 and not list(tmp_path.glob(".*tmp*"))


def test_diagnose_writes_figures_and_tables(tmp_path, tiny_checkpoints, capsys):
    ebm, ddpm = tiny_checkpoints[1]
    config = write(tmp_path, "diag.yaml", {
        "output_dir": str(tmp_path / "diag"), "data": DATA, "attack": ATTACK, "ebm": str(ebm), "ddpm": str(ddpm),
        "langevin": {"steps": 4}, "every": 2, "ddpm_grid": [0, 2], "num_images": 4,
        "survival": {"num_images": 4, "langevin_steps": 4}, "tracking": {"experiment": "diag"}})
    assert main(["-q", "diagnose", str(config)]) == 0
    names = {p.name for p in (tmp_path / "diag").iterdir()}
    assert {"energy_histogram.png", "energies.csv", "ebm_l2_trajectories.png", "ebm_l2_trajectories.csv",
            "ddpm_l2_trajectories.png", "ddpm_l2_trajectories.csv", "mlflow.db"} <= names
    assert Image.open(tmp_path / "diag" / "energy_histogram.png").size[0] > 100
    rows = (tmp_path / "diag" / "ebm_l2_trajectories.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header + steps 0, 2, 4


def test_diagnose_measures_trigger_survival_per_step(tmp_path, tiny_checkpoints):
    from mlflow.tracking import MlflowClient

    ebm, ddpm = tiny_checkpoints[1]
    config = write(tmp_path, "diag.yaml", {
        "output_dir": str(tmp_path / "diag"), "data": DATA, "attack": ATTACK, "ebm": str(ebm), "ddpm": str(ddpm),
        "langevin": {"steps": 4}, "every": 2, "ddpm_grid": [0, 3], "diffusion": {"steps": 3}, "num_images": 3,
        "survival": {"patterns": ["sign", "smooth4", "attack"], "num_images": 5, "langevin_steps": 6},
        "tracking": {"experiment": "diag"}})
    assert main(["-q", "diagnose", str(config)]) == 0
    out = tmp_path / "diag"
    assert (out / "survival_ebm.png").is_file() and (out / "survival_ddpm.png").is_file()
    rows = list(csv.DictReader((out / "survival.csv").open()))
    ebm_steps = {int(r["step"]) for r in rows if r["model"] == "ebm"}
    assert ebm_steps == {0, 2, 4, 6}  # every 2 up to survival.langevin_steps, plus langevin.steps
    assert {r["pattern"] for r in rows} == {"sign", "smooth4", "attack"}
    at_zero = [float(r["rho_mean"]) for r in rows if r["step"] == "0"]
    assert all(abs(v - 1.0) < 1e-4 for v in at_zero)  # nothing purified yet: δ passes whole
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("diag").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "ebm_rho_sign")
    assert sorted(m.step for m in history) == [0, 2, 4, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ddpm_rho_attack")] == [0, 3]
    # the ρ table is written beside the CSV and re-derives from the MLflow run alone
    table = (out / "survival.md").read_text()
    assert "| pattern | 0 | 2 | **4** | 6 |" in table and "| pattern | 0 | **3** |" in table
    assert table.index("| smooth4 |") < table.index("| attack |")  # the attack's own perturbations last
    rederived = survival_markdown(survival_rows_from_metrics(latest_metric_histories(
        f"sqlite:///{out / 'mlflow.db'}", "diag")), {"ebm": 4, "ddpm": 3})
    assert rederived == table


@pytest.mark.parametrize(("data", "kind"), [
    ({"train": {"epochs": 1}, "ebm": {"nf": 8}}, "train-ebm"),
    ({"train": {"epochs": 1}, "ddpm": {"size": "S"}}, "train-ddpm"),
    ({"output": "x.parquet", "defense": {"name": "jpeg"}}, "purify"),
    ({"ebm": "some/dir"}, "diagnose"),
    ({"classifier": {"epochs": 1}}, "run"),
])
def test_show_config_resolves_every_job_kind(tmp_path, capsys, data, kind):
    assert main(["show-config", str(write(tmp_path, "c.yaml", data))]) == 0
    captured = capsys.readouterr()
    assert f"`puregen-dist {kind}`" in captured.err and yaml.safe_load(captured.out)


@pytest.mark.parametrize(("command", "data", "needle"), [
    ("train-ebm", {"train": {"epochs": 0}}, "train.epochs"),
    ("train-ebm", {"ebm": {"arch": "unet"}}, "ebm.arch"),
    ("train-ddpm", {"ddpm": {"size": "XL"}}, "ddpm.size"),
    ("purify", {"defense": {"name": "puregen_ebm"}}, "defense.ebm"),
    ("purify", {"defense": {"name": "puregen_ebm", "ebm": "/nonexistent/ebm"}}, "/nonexistent/ebm"),
    ("diagnose", {"num_images": 4}, "ebm"),
    ("run", {"defense": {"name": "puregen_ddpm", "ddpm": "/nonexistent/ddpm"}}, "/nonexistent/ddpm"),
])
def test_generative_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, command, data, needle):
    out = tmp_path / "out"
    target = {"train-ebm": "output", "train-ddpm": "output", "purify": "output", "diagnose": "output_dir",
              "run": "output_dir"}[command]
    data = {**data, target: str(out / "x")}
    code = main(["-q", command, str(write(tmp_path, "bad.yaml", data))])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.startswith("error: ")
    assert not out.exists()


def test_artifacts_command_lists_shows_removes_and_collects(tmp_path, capsys):
    from conftest import make_imageset
    from puregen_dist.pipeline.store import ArtifactStore, artifact_key

    store = ArtifactStore(tmp_path / "store")
    key = artifact_key("poison", {"attack": "badnets"})
    store.put_imageset(key, make_imageset(n=4), kind="poison", config={"attack": "badnets"})
    base = ["artifacts", "--store", str(tmp_path / "store")]
    assert main([*base[:1], "ls", *base[1:]]) == 0 and key in capsys.readouterr().out
    assert main([base[0], "show", key, *base[1:]]) == 0 and '"kind": "poison"' in capsys.readouterr().out
    assert main([base[0], "rm", key, *base[1:]]) == 0 and not store.exists(key)
    capsys.readouterr()
    assert main([base[0], "show", key, *base[1:]]) == 2 and key in capsys.readouterr().err
    assert main([base[0], "gc", *base[1:]]) == 0


def test_export_reference_then_import_under_the_recipe_key(tmp_path, capsys):
    from puregen_dist.config.generative import EBMJob
    from puregen_dist.config.loading import load_config
    from puregen_dist.pipeline.keys import model_artifact
    from puregen_dist.pipeline.store import ArtifactStore

    recipe = write(tmp_path, "ebm.yaml", {
        "output": str(tmp_path / "ebm"), "data": DATA, "ebm": {"nf": 8, "in_channels": 1, "image_size": 16},
        "train": {"epochs": 1, "batch_size": 8, "bank_size": 16, "mcmc_steps": 2, "sample_grid": 0},
        "tracking": {"enabled": False}})
    assert main(["-q", "train-ebm", str(recipe)]) == 0
    assert main(["-q", "export-reference", str(recipe), "--to", str(tmp_path / "ref")]) == 0
    key = model_artifact(load_config(EBMJob, recipe))[1]
    assert f"(key {key})" in capsys.readouterr().out
    store = tmp_path / "store"
    assert main(["-q", "artifacts", "import", str(tmp_path / "ref"), "--store", str(store)]) == 0
    assert f"{key} imported" in capsys.readouterr().out
    assert ArtifactStore(store).manifest(key)["kind"] == "ebm"
    assert main(["-q", "artifacts", "import", "no-such-reference", "--store", str(store)]) == 2
