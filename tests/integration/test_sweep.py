"""`puregen-dist sweep` end to end under a local Ray: artifacts built once, 8 trials as Ray Tune trials, one
parent and 8 child MLflow runs, the report, a re-run that does nothing, retries and failures (the killed
driver, and relative paths resolved inside trials: test_sweep_resume.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from puregen_dist.cli import main
from puregen_dist.pipeline.store import ArtifactStore

pytestmark = pytest.mark.ray

mlflow = pytest.importorskip("mlflow")


def sweep_file(tmp_path: Path, name: str = "t", **settings) -> Path:
    """Digits, 2 architectures x 2 seeds x 2 defenses x 1 attack = 8 cells, 1 epoch each."""
    data = {
        "name": name,
        "base": {"output_dir": str(tmp_path / "out"),
                 "data": {"dataset": "digits", "train_per_class": 12, "test_fraction": 0.25},
                 "attack": {"name": "badnets", "target_class": 0, "budget": 0.1, "label_mode": "dirty"},
                 "classifier": {"name": "small_cnn", "epochs": 1, "batch_size": 32, "threads": 1,
                                "crop_padding": 1, "flip": False},
                 "eval": {"magnifications": [1.0]}},
        "space": {"classifier.name": ["small_cnn", "hlb_small"],
                  "defense": {"grid": [{"name": "none"}, {"name": "jpeg", "quality": 50}]}},
        "settings": {"seeds": [0, 1], "trial_cpus": 1, "max_concurrent_trials": 2, "max_failures": 1,
                     "storage": str(tmp_path / "tune"), "store": str(tmp_path / "store"),
                     "pipeline": {"actors": 1, "batch_size": 32, "cpu_tasks": 1, "craft": {"num_cpus": 1}},
                     **settings},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_runs(tmp_path: Path, experiment: str = "t"):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if "cell_id" in r.data.tags]
    return client, parents, children


def test_sweep_builds_once_runs_8_trials_and_reports(ray_session, tmp_path, capsys):
    path = sweep_file(tmp_path)
    assert main(["-q", "sweep", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    # per seed: the poisoned set and the clean set, whose purified rows the poisoned set's purified set reuses
    assert "poison sets: 4 (4 to build, 0 cached)" in plan and "purified sets: 4 (4 to build" in plan
    assert plan.count("(clean rows, shared)") == 2
    assert "trials: 8 (8 to run, 0 already finished)" in plan

    assert main(["-q", "sweep", str(path)]) == 0
    out = capsys.readouterr().out
    store = ArtifactStore(tmp_path / "store")
    kinds = sorted(m["kind"] for m in store.ls())
    assert kinds == ["poison"] * 4 + ["purified"] * 4  # each built exactly once
    assert sorted(m["stats"]["rows_purified"] for m in store.ls() if m["kind"] == "purified") == [12, 12, 120, 120]
    _, parents, children = child_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["cell_id"] for r in children}) == 8
    one = children[0]
    assert {"classifier.name", "defense.name", "seed", "attack.budget"} <= set(one.data.params)
    assert {"nat_acc", "poison_success_m1", "train_seconds", "test_acc"} <= set(one.data.metrics)
    assert {"metric.nat_acc", "metric.poison_success", "artifact.train", "col", "seed"} <= set(one.data.tags)
    assert one.data.tags["artifact.poison"] in {m["key"] for m in store.ls()}
    assert {r.data.tags["row"] for r in children} == {"none", "jpeg"}
    assert parents[0].data.params["cells"] == "8"

    # the report printed at the end of the sweep matches the runs
    nat = np.mean([r.data.metrics["nat_acc"] for r in children if r.data.tags["row"] == "jpeg"]) * 100
    assert f"{nat:.1f}" in out
    published = tmp_path / "published"
    assert main(["-q", "report", "t", "--output-dir", str(tmp_path / "out"), "--report-dir", str(published),
                 "--with-runs", "--paper", "table1"]) == 0
    report = capsys.readouterr().out
    assert f"{nat:.1f}" in report and "Beside the paper (table1)" in report
    assert {"report.csv", "report_paper.md", "mlflow.db", "source.json"} <= {p.name for p in published.iterdir()}
    assert json.loads((published / "source.json").read_text())["experiment"] == "t"

    # a second invocation runs nothing and builds nothing
    before = {m["key"]: m["created"] for m in store.ls()}
    assert main(["-q", "sweep", str(path)]) == 0
    assert "trials: 8 (0 to run, 8 already finished)" in capsys.readouterr().out
    assert {m["key"]: m["created"] for m in store.ls()} == before
    _, parents, children = child_runs(tmp_path)
    assert len(children) == 8 and len(parents) == 2


def test_narcissus_over_three_targets_builds_one_surrogate_and_reuses_everything(ray_session, tmp_path, capsys):
    """The shipped Narcissus recipe scaled down through --set only: one surrogate for target classes 0-2, one
    poison set per target, and a second run that builds and runs nothing."""
    small = [f"base.output_dir={tmp_path / 'out'}", f"settings.storage={tmp_path / 'tune'}",
             f"settings.store={tmp_path / 'store'}", "base.classifier.epochs=1", "base.attack.rounds=5",
             "base.attack.warmup_epochs=1", "models.surrogate.classifier.epochs=2",
             "space.defense.grid=[{name: none}]"]
    args = ["-q", "sweep", "sweeps/narcissus_digits.yaml", *[a for s in small for a in ("--set", s)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| none | " in out and "narcissus" in out
    store = ArtifactStore(tmp_path / "store")
    kinds = sorted(m["kind"] for m in store.ls())
    assert kinds == ["poison", "poison", "poison", "surrogate"]
    crafted = [m for m in store.ls() if m["kind"] == "poison"]
    assert sorted(m["config"]["attack"]["target_class"] for m in crafted) == [0, 1, 2]
    assert {m["config"]["models"]["surrogate"] for m in crafted} == {
        next(m["key"] for m in store.ls() if m["kind"] == "surrogate")}
    assert all(m["stats"]["num_poisons"] == 34 for m in crafted)
    before = {m["key"]: m["created"] for m in store.ls()}
    assert main([*args[:3], "--dry-run", *args[3:]]) == 0
    plan = capsys.readouterr().out
    assert "models: 1 (0 to build, 1 cached)" in plan and "poison sets: 3 (0 to build, 3 cached)" in plan
    assert main(args) == 0
    assert "trials: 3 (0 to run, 3 already finished)" in capsys.readouterr().out
    assert {m["key"]: m["created"] for m in store.ls()} == before


def test_gradient_matching_trials_report_wilson_intervals_and_rerun_builds_nothing(ray_session, tmp_path, capsys):
    """The shipped Gradient Matching recipe scaled down through --set only: 3 trials (poison keys) x {none,
    PureGen-EBM}; one surrogate, one EBM, 3 poison sets and 3 purified sets; each table cell is a success rate
    over the 3 trials with its Wilson interval; each run records its target id, adversarial label and poison key."""
    small = [f"base.output_dir={tmp_path / 'out'}", f"settings.storage={tmp_path / 'tune'}",
             f"settings.store={tmp_path / 'store'}", "settings.trials=3", "base.classifier.epochs=1",
             "base.attack.iterations=2",
             "base.attack.restarts=1", "models.surrogate.classifier.epochs=1", "models.ebm.train.epochs=1",
             "space.defense.grid=[{name: none}, {name: puregen_ebm, ebm: 'model:ebm', langevin: {steps: 3}}]"]
    args = ["-q", "sweep", "sweeps/gradient_matching_digits.yaml", *[a for s in small for a in ("--set", s)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| none |", "| puregen_ebm"))]
    assert len(rows) == 2 and all("[" in row and "]" in row for row in rows), out  # rate [Wilson interval]
    store = ArtifactStore(tmp_path / "store")
    kinds = sorted(m["kind"] for m in store.ls())
    assert kinds == ["classifier", "ebm"] + ["poison"] * 4 + ["purified"] * 4  # + the clean set, purified once
    crafted = [m for m in store.ls() if m["kind"] == "poison" and m["config"]["attack"]["name"] != "none"]
    assert sorted(m["config"]["attack"]["poison_key"] for m in crafted) == list(range(3))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gradient-matching-digits")
    children = [r for r in client.search_runs([exp.experiment_id]) if "cell_id" in r.data.tags]
    assert len(children) == 6
    assert {r.data.params["attack.poison_key"] for r in children} == {str(k) for k in range(3)}
    assert all("target_success" in r.data.metrics for r in children)
    assert all({"target.ids", "target.adversarial_label"} <= set(r.data.params) for r in children)
    before = {m["key"]: m["created"] for m in store.ls()}
    assert main(args) == 0
    assert "trials: 6 (0 to run, 6 already finished)" in capsys.readouterr().out
    assert {m["key"]: m["created"] for m in store.ls()} == before


def test_retry_then_success_and_a_failure_that_stays(ray_session, tmp_path):
    from puregen_dist.sweep.runner import run_sweep
    from puregen_dist.sweep.spec import load_sweep
    from puregen_dist.sweep.trial import run_trial

    marker = tmp_path / "flaky-cell-failed-once"  # touched by the flaky cell only (trials run concurrently)
    sweep = load_sweep(sweep_file(tmp_path), ["space.classifier.name=[small_cnn]", "settings.seeds=[0]"])
    flaky_cell, broken_cell = sweep.cells[0].cell_id, sweep.cells[1].cell_id

    def flaky(config):
        spec = config["trial"]
        fail = spec["cell_id"] == broken_cell
        if spec["cell_id"] == flaky_cell and not marker.exists():
            marker.touch()
            fail = True
        if fail:
            config = {"trial": {**spec, "train_key": "purified-0000000000000000"}}  # fails inside the run
        run_trial(config)

    outcome = run_sweep(sweep, trainable=flaky, echo=lambda line: None)
    assert outcome.trials_failed == [broken_cell]
    _, parents, children = child_runs(tmp_path)
    by_cell = {}
    for run in children:
        by_cell.setdefault(run.data.tags["cell_id"], []).append(run.info.status)
    assert sorted(by_cell[flaky_cell]) == ["FAILED", "FINISHED"]  # retried and succeeded
    assert by_cell[broken_cell] == ["FAILED", "FAILED"]  # 1 + max_failures attempts, error recorded
    failed = [r for r in children if r.data.tags["cell_id"] == broken_cell]
    assert all("purified-0000000000000000" in r.data.tags["error"] for r in failed)
    assert parents[0].info.status == "FAILED"


def test_quickstart_command_prints_its_table(ray_session, tmp_path, monkeypatch, capsys):
    """`puregen-dist quickstart` end to end, scaled down through --set only (the full run: README)."""
    monkeypatch.chdir(tmp_path)
    small = ["base.data.train_per_class=16", "models.ebm.data.train_per_class=8",
             "models.ddpm.data.train_per_class=8", "models.ebm.train.epochs=1", "models.ebm.train.bank_size=64",
             "models.ddpm.train.epochs=1", "models.ddpm.train.sample_grid=0",  # the grid: test_ddpm.py
             "models.surrogate.classifier.epochs=2", "base.classifier.epochs=1",
             "space.attack.grid=[{name: badnets, target_class: 0, budget: 0.1, label_mode: dirty, trigger: sign, "
             "eps: 0.0627451}, {name: narcissus, surrogate: 'model:surrogate', eps: 0.1254902, budget: 0.05, "
             "rounds: 5, crop_padding: 1, flip: false}]", "settings.seeds=[0]",
             "space.defense.grid=[{name: none}, {name: jpeg, quality: 50}, {name: puregen_ebm, ebm: 'model:ebm', "
             "langevin: {steps: 10}, batch_size: 64}, {name: puregen_ddpm, ddpm: 'model:ddpm', diffusion: {steps: 5}, "
             "batch_size: 64}]"]
    assert main(["quickstart", *[arg for s in small for arg in ("--set", s)]]) == 0
    out, err = capsys.readouterr()
    for row in ("none", "jpeg", "puregen_ebm", "puregen_ddpm"):
        assert f"| {row} | " in out
    assert "| defense \\ attack | badnets | narcissus |" in out
    assert "models: 3 (3 to build, 0 cached)" in out and "trials: 8 (8 to run" in out
    uri = f"sqlite:///{tmp_path / 'outputs' / 'quickstart' / 'mlflow.db'}"
    assert out.splitlines()[-1] == f"browse: mlflow ui --backend-store-uri {uri}"
    assert (tmp_path / "outputs" / "quickstart" / "report" / "report_heatmap.png").is_file()
    # one progress line per stage start/end (plain lines: stderr is not a terminal), Ray's logs in the file
    # 3 defenses purify the 160 clean rows once each, then only the poisons of the 2 poison sets (not 6 x 160)
    assert "models: 3/3 trained" in err
    done, total = re.findall(r"purified sets: (\d+)/(\d+) rows", err)[-1]
    assert done == total and 3 * 160 < int(total) < 4 * 160, err
    assert "trials: 8/8 finished, 8/8 epochs" in err
    assert len(out.splitlines()) + len(err.splitlines()) <= 100  # about two screens
    (log_file,) = (tmp_path / "outputs" / "quickstart" / "logs").glob("sweep-*.log")
    assert "Execution plan of Dataset" not in err and "Execution plan of Dataset" in log_file.read_text()


def test_attacked_cells_get_the_floor_of_the_rows_clean_classifier(ray_session, tmp_path, capsys):
    """An attack-none cell stores its classifier; after the trials each attacked cell of the same row gets the
    clean classifier's success on the same triggered images (the floor), logged to its run and in the report."""
    from puregen_dist.attacks.surrogate import load_classifier
    from puregen_dist.classifiers.evaluation import poison_success
    from puregen_dist.data.datasets import load_data
    from puregen_dist.pipeline.stages import read_target
    from puregen_dist.sweep.spec import load_sweep

    path = sweep_file(tmp_path, "floors")
    overrides = ["space.classifier.name=[small_cnn]", "space.defense.grid=[{name: none}, {name: jpeg, quality: 50}]",
                 "space.attack.grid=[{name: none}, {name: badnets, target_class: 0, budget: 0.1, label_mode: dirty}]",
                 "settings.seeds=[0]"]
    args = ["-q", "sweep", str(path), *[a for o in overrides for a in ("--set", o)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    store = ArtifactStore(tmp_path / "store")
    clean_models = [m for m in store.ls() if m["kind"] == "classifier"]
    assert len(clean_models) == 2  # one clean classifier per row (none, jpeg)
    client, _, children = child_runs(tmp_path, "floors")
    attacked = [r for r in children if r.data.tags["col"] == "badnets"]
    assert len(attacked) == 2 and all("floor_poison_success_m1" in r.data.metrics for r in attacked)
    # the logged floor is the clean classifier of the same row on that cell's triggered test images
    sweep = load_sweep(path, overrides)
    cell = next(c for c in sweep.cells if c.row == "none" and c.col == "badnets")
    run = next(r for r in attacked if r.data.tags["cell_id"] == cell.cell_id)
    model_key = next(m["key"] for m in clean_models if m["inputs"][0].startswith("poison-"))  # row none
    model, _ = load_classifier(store.get_dir(model_key))
    rate = poison_success(model, load_data(cell.config.data)[1], read_target(store, run.data.tags["artifact.poison"]))
    assert run.data.metrics["floor_poison_success_m1"] == pytest.approx(rate.rate)
    assert ", floor " in out and "- Floor: the same measurement" in out
    # a second invocation finds the floors logged and logs nothing again
    assert main(args) == 0
    _, _, again = child_runs(tmp_path, "floors")
    history = client.get_metric_history(run.info.run_id, "floor_poison_success_m1")
    assert len(history) == 1 and len(again) == len(children)


def test_every_baseline_defense_runs_as_a_sweep_row(ray_session, tmp_path, capsys):
    """FRIENDS, EPIC (training hooks in the trial) and the two filters (a whole-set task, one detector per poison
    set shared by both) as rows of one sweep; the removal they did is logged with precision and recall."""
    detector = {"name": "small_cnn", "epochs": 3, "batch_size": 32, "threads": 1, "crop_padding": 1, "flip": False}
    path = sweep_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["base"]["data"]["train_per_class"] = 30
    data["base"]["classifier"]["epochs"] = 3
    data["settings"]["seeds"] = [0]
    data["space"] = {"defense": {"grid": [
        {"name": "none"}, {"name": "friends_b", "begin_epoch": 1, "iterations": 2},
        {"name": "epic", "subset_size": 0.3, "subset_freq": 1, "drop_after": 1},
        {"name": "spectral_signatures", "poison_fraction": 0.33, "detector": detector},
        {"name": "activation_clustering", "detector": detector}]}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["-q", "sweep", str(path)]) == 0
    out = capsys.readouterr().out
    for row in ("friends_b", "epic", "spectral_signatures", "activation_clustering"):
        assert row in out
    store = ArtifactStore(tmp_path / "store")
    manifests = store.ls()
    assert [m["kind"] for m in manifests].count("classifier") == 1  # the detector, trained once, shared
    filtered = [m for m in manifests if m["kind"] == "purified"]
    assert len(filtered) == 2 and all(m["stats"]["rows_removed"] > 0 for m in filtered)
    _, _, children = child_runs(tmp_path)
    by_defense = {r.data.params["defense.name"]: r.data.metrics for r in children}
    assert by_defense["friends_b"]["friendly_rounds"] == 1 and by_defense["friends_b"]["defense_seconds"] > 0
    assert by_defense["epic"]["epic_rounds"] == 2 and by_defense["epic"]["rows_removed"] > 0
    for name in ("spectral_signatures", "activation_clustering", "epic"):
        assert 0 <= by_defense[name]["removal_recall"] <= 1 and "removal_precision" in by_defense[name]
    assert by_defense["spectral_signatures"]["removal_recall"] >= 0.5
    assert "removal_recall" not in by_defense["none"] and "removal_recall" not in by_defense["friends_b"]
