"""The sweep results table: golden aggregation numbers, MLflow fetching (sqlite), the written report files.

The report consumes MLflow's ``search_runs`` DataFrame; the golden runs below go through the reader's
:func:`~puregen_dist.tracking.reader.runs_frame` so that the report is tested on exactly that format."""

from __future__ import annotations

import ast
import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from puregen_dist.config.errors import UserInputError
from puregen_dist.sweep import report
from puregen_dist.sweep.report import (
    CSV_COLUMNS,
    build_table,
    fetch_runs,
    format_cell,
    latest_per_cell,
    removal,
    removal_markdown,
    steps_plot_png,
    to_csv_rows,
    to_markdown,
    write_report,
)
from puregen_dist.tracking.reader import runs_frame

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARENT = "a" * 32

# (defense, target class) -> poison success m=1 per seed (seeds 0, 1)
POISON_M1 = {("puregen_ebm", 0): [0.1, 0.0], ("puregen_ebm", 1): [0.2, 0.3],
             ("none", 0): [0.9, 0.8], ("none", 1): [0.6, 0.5]}
POISON_M3 = {("puregen_ebm", 0): [0.2, 0.2], ("puregen_ebm", 1): [0.4, 0.4],
             ("none", 0): [1.0, 1.0], ("none", 1): [0.9, 0.7]}
NAT_ACC = {"none": [0.95, 0.94, 0.96, 0.91], "puregen_ebm": [0.90, 0.92, 0.91, 0.89]}
TARGET_SUCCESS = {"none": [1, 1, 0, 1, 1], "puregen_ebm": [0, 0, 0, 1, 0]}
STATS = {"poison_m1": ("_mean", "_std", "_max_over_targets", "_n", "_n_targets"),
         "poison_m3": ("_mean", "_std", "_max_over_targets", "_n", "_n_targets"),
         "target_success": ("_rate", "_successes", "_n", "_ci_low", "_ci_high")}


def _absent(cell: pd.Series, group: str) -> bool:
    """No statistic of ``group`` (``poison_m1``, ``poison_m3``, ``target_success``) applies to ``cell``."""
    return all(pd.isna(cell[group + suffix]) for suffix in STATS[group])


def _record(row: str, col: str, kind: str, seed: int, target: int | None, metrics: dict[str, float],
            **params: str) -> SimpleNamespace:
    """A sweep child run shaped like ``mlflow.entities.Run`` (what :func:`runs_frame` reads)."""
    cell = f"cell-{row}-{col}-{seed}-{target}"
    tags = {"mlflow.parentRunId": PARENT, "cell_id": cell, "row": row, "col": col, "attack.kind": kind,
            "seed": str(seed), **({"target_class": str(target)} if target is not None else {})}
    info = SimpleNamespace(run_id=f"run-{cell}", experiment_id="1", status="FINISHED", artifact_uri="",
                           start_time=0, end_time=1)
    return SimpleNamespace(info=info, data=SimpleNamespace(metrics=metrics, params=dict(params), tags=tags))


def golden_runs() -> pd.DataFrame:
    """puregen_ebm first on purpose (``none`` must still be the first row); a triggered attack
    (2 target classes × 2 seeds), a triggerless attack (5 runs) and a clean column (1 run)."""
    runs = []
    for row in ("puregen_ebm", "none"):
        nat = iter(NAT_ACC[row])
        for target in (0, 1):
            for seed in (0, 1):
                metrics = {"poison_success_m1": POISON_M1[row, target][seed],
                           "poison_success_m3": POISON_M3[row, target][seed], "nat_acc": next(nat)}
                runs.append(_record(row, "badnets", "triggered", seed, target, metrics))
        for i, hit in enumerate(TARGET_SUCCESS[row]):
            runs.append(_record(row, "bullseye", "triggerless", i, None,
                                {"target_success": float(hit), "nat_acc": 0.9}))
        runs.append(_record(row, "clean", "none", 0, None, {"nat_acc": 0.97}))
    return runs_frame(runs)


def _wilson_by_hand(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ----------------------------------------------------------------------------------------- aggregation


def test_rows_none_first_and_clean_columns_first():
    table = build_table(golden_runs())
    assert table.rows == ["none", "puregen_ebm"]
    assert table.cols == ["clean", "badnets", "bullseye"]
    assert len(table.stats) == 6


@pytest.mark.parametrize("row", ["none", "puregen_ebm"])
def test_triggered_cell_golden_numbers(row):
    cell = build_table(golden_runs()).cell(row, "badnets")
    for p, by_target in (("poison_m1", POISON_M1), ("poison_m3", POISON_M3)):
        values = by_target[row, 0] + by_target[row, 1]
        assert cell[f"{p}_mean"] == pytest.approx(statistics.fmean(values))
        assert cell[f"{p}_std"] == pytest.approx(statistics.stdev(values))  # ddof=1
        best = max(statistics.fmean(by_target[row, t]) for t in (0, 1))
        assert cell[f"{p}_max_over_targets"] == pytest.approx(best)
        assert (cell[f"{p}_n"], cell[f"{p}_n_targets"]) == (4, 2)
    assert cell["nat_acc_mean"] == pytest.approx(statistics.fmean(NAT_ACC[row]))
    assert cell["nat_acc_std"] == pytest.approx(statistics.stdev(NAT_ACC[row]))
    assert cell["n_runs"] == 4 and _absent(cell, "target_success")


@pytest.mark.parametrize("row", ["none", "puregen_ebm"])
def test_triggerless_cell_is_a_rate_with_a_wilson_interval(row):
    cell = build_table(golden_runs()).cell(row, "bullseye")
    hits = TARGET_SUCCESS[row]
    assert (cell["target_success_successes"], cell["target_success_n"]) == (sum(hits), 5)
    assert cell["target_success_rate"] == pytest.approx(sum(hits) / 5)
    assert (cell["target_success_ci_low"], cell["target_success_ci_high"]) == pytest.approx(
        _wilson_by_hand(sum(hits), 5))
    assert _absent(cell, "poison_m1") and cell["nat_acc_std"] == 0.0
    assert cell["nat_acc_mean"] == pytest.approx(0.9)


def test_wilson_literal_values():
    cell = build_table(golden_runs()).cell("none", "bullseye")
    assert (cell["target_success_ci_low"], cell["target_success_ci_high"]) == pytest.approx((0.3755, 0.9638),
                                                                                            abs=1e-4)


def test_single_run_has_zero_std_and_no_attack_cell_has_only_accuracy():
    cell = build_table(golden_runs()).cell("none", "clean")
    assert (cell["nat_acc_mean"], cell["nat_acc_std"], cell["nat_acc_n"]) == (0.97, 0.0, 1)
    assert _absent(cell, "poison_m1") and _absent(cell, "poison_m3") and _absent(cell, "target_success")


def test_mixed_attack_kinds_in_a_column_and_no_runs_are_errors():
    extra = runs_frame([_record("none", "badnets", "triggerless", 9, None, {"target_success": 1.0})])
    with pytest.raises(ValueError, match="badnets"):
        build_table(pd.concat([golden_runs(), extra], ignore_index=True))
    with pytest.raises(ValueError):
        build_table(runs_frame([]))


# ------------------------------------------------------------------------------------------- renderers


def test_markdown_cells_and_caption():
    text = to_markdown(build_table(golden_runs()))
    lines = text.splitlines()
    assert lines[0] == "| defense \\ attack | clean | badnets | bullseye |"
    none_line = next(line for line in lines if line.startswith("| none |"))
    # poison m=1 [.9,.8,.6,.5]: mean 70.0, std 18.3, max target mean 85.0; nat [.95,.94,.96,.91]: 94.0 ± 2.2
    assert "| 70.0 ± 18.3 (max 85.0) / 94.0 ± 2.2 |" in none_line
    assert "| 80.0 [37.6, 96.4] / 90.0 ± 0.0 |" in none_line
    assert none_line.startswith("| none | 97.0 ± 0.0 |")
    ebm_line = next(line for line in lines if line.startswith("| puregen_ebm |"))
    assert lines.index(none_line) < lines.index(ebm_line)
    ebm = POISON_M1["puregen_ebm", 0] + POISON_M1["puregen_ebm", 1]
    expected = f"{100 * statistics.fmean(ebm):.1f} ± {100 * statistics.stdev(ebm):.1f} (max 25.0)"
    assert expected in ebm_line
    assert "sample std (ddof=1)" in text and "Wilson" in text
    assert "Natural accuracy: top-1 accuracy" in text and "magnification m" in text
    assert "m=3" in text  # the second table, m3 was recorded


def test_floors_are_averaged_and_shown_beside_the_figure():
    runs = golden_runs()
    triggered = runs["tags.col"] == "badnets"
    runs.loc[triggered, "metrics.floor_poison_success_m1"] = [0.01, 0.03] * 4
    runs.loc[runs["tags.col"] == "bullseye", "metrics.floor_target_success"] = 0.0
    table = build_table(runs)
    cell = table.cell("none", "badnets")
    assert cell["floor_m1_mean"] == pytest.approx(0.02) and pd.isna(cell["floor_m3_mean"])
    assert format_cell(cell) == "70.0 ± 18.3 (max 85.0, floor 2.0) / 94.0 ± 2.2"
    assert format_cell(cell, 3) == "90.0 ± 14.1 (max 100.0) / 94.0 ± 2.2"  # no floor recorded at m=3
    assert format_cell(table.cell("none", "bullseye")) == "80.0 [37.6, 96.4] (floor 0.0) / 90.0 ± 0.0"
    assert "floor" not in format_cell(build_table(golden_runs()).cell("none", "badnets"))


def test_csv_rows_long_format(tmp_path):
    rows = to_csv_rows(build_table(golden_runs()))
    assert len(rows) == 6 and all(tuple(r) == CSV_COLUMNS for r in rows)
    assert [(r["row"], r["col"]) for r in rows[:3]] == [("none", "clean"), ("none", "badnets"),
                                                        ("none", "bullseye")]
    badnets = rows[1]
    assert badnets["poison_m1_max_over_targets"] == pytest.approx(0.85)
    assert badnets["target_success_rate"] is None
    paths = write_report(golden_runs(), tmp_path)
    with open(paths["csv"], newline="") as handle:
        back = list(csv.DictReader(handle))
    assert len(back) == 6 and tuple(back[0]) == CSV_COLUMNS
    assert float(back[2]["target_success_ci_low"]) == pytest.approx(_wilson_by_hand(4, 5)[0])


# ---------------------------------------------------------------------------------------------- files


def steps_runs(steps: tuple[int, ...]) -> pd.DataFrame:
    runs = [_record("none", "badnets", "triggered", 0, 0, {"poison_success_m1": 0.9, "nat_acc": 0.95},
                    **{"defense.name": "none"})]
    for s in steps:
        for seed in (0, 1):
            runs.append(_record(f"puregen_ebm (langevin.steps={s})", "badnets", "triggered", seed, 0,
                                {"poison_success_m1": 1.0 / s, "nat_acc": 0.9},
                                **{"defense.name": "puregen_ebm", "defense.langevin.steps": str(s)}))
    return runs_frame(runs)


def test_write_report_with_varied_langevin_steps(tmp_path):
    paths = write_report(steps_runs((50, 150)), tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "heatmap", "targets", "langevin_steps"}
    assert paths["langevin_steps"].name == "report_langevin_steps.png"
    for key in ("heatmap", "langevin_steps"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    assert paths["markdown"].read_text().startswith("| defense \\ attack | badnets |")
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_diffusion_steps_get_their_own_plot_and_defaults_of_other_defenses_are_ignored(tmp_path):
    runs = [_record("none", "badnets", "triggered", 0, 0, {"poison_success_m1": 0.9, "nat_acc": 0.95},
                    **{"defense.name": "none"})]
    for t in (25, 75, 125):  # a DDPM run also records the (unused) Langevin default: never a Langevin curve
        runs.append(_record(f"puregen_ddpm (diffusion.steps={t})", "badnets", "triggered", 0, 0,
                            {"poison_success_m1": 1.0 / t, "nat_acc": 0.9 - t / 1000},
                            **{"defense.name": "puregen_ddpm", "defense.diffusion.steps": str(t),
                               "defense.langevin.steps": "150"}))
    runs = runs_frame(runs)
    curves = report.steps_curves(runs, "defense.diffusion.steps")
    assert curves["steps"].tolist() == [25, 75, 125] and set(curves["defense"]) == {"puregen_ddpm"}
    assert curves["nat"].tolist() == pytest.approx([0.875, 0.825, 0.775])
    assert curves["poison_m3"].isna().all()  # not measured: no dashed line
    assert report.steps_curves(runs).empty
    paths = write_report(runs, tmp_path)
    assert set(paths) == {"markdown", "csv", "heatmap", "targets", "diffusion_steps"}
    assert paths["diffusion_steps"].read_bytes()[:8] == PNG_MAGIC


def test_steps_curves_carry_the_m3_success_where_measured():
    runs = [_record(f"puregen_ebm (langevin.steps={s})", "narcissus", "triggered", 0, 0,
                    {"poison_success_m1": 0.1, "poison_success_m3": m3, "nat_acc": 0.6},
                    **{"defense.name": "puregen_ebm", "defense.langevin.steps": str(s)})
            for s, m3 in ((0, 0.4), (150, 0.2), (150, 0.1))]
    curves = report.steps_curves(runs_frame(runs))
    assert curves["steps"].tolist() == [0, 150]
    assert curves["poison_m3"].tolist() == pytest.approx([0.4, 0.15])


def test_steps_plot_only_when_steps_vary(tmp_path):
    assert not steps_plot_png(steps_runs((150,)), tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
    (tmp_path / "report_langevin_steps.png").write_bytes(b"stale")
    paths = write_report(golden_runs(), tmp_path)
    assert set(paths) == {"markdown", "csv", "heatmap", "targets"}
    assert not (tmp_path / "report_langevin_steps.png").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.csv", "report_heatmap.png", "report_targets.md"}
    assert paths["heatmap"].read_bytes()[:8] == PNG_MAGIC


def test_mlflow_is_imported_lazily():
    """Only function bodies import mlflow or ray, so the pure parts import without them (its other imports,
    classifiers.evaluation and plots, are covered by tests/test_layering.py)."""
    tree = ast.parse(Path(report.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert modules and not [m for m in modules if m.split(".")[0] in {"mlflow", "ray"}]


def test_report_imports_with_mlflow_and_ray_blocked():
    """Stronger than the AST check: nothing the report imports (the reader included) imports MLflow or Ray."""
    blocker = ("import importlib.abc, sys\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in {'ray', 'mlflow'}:\n"
               "            raise ImportError(f'layering violation: {name} imported')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import puregen_dist.sweep.report\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def sweep_db(tmp_path_factory):
    """A sqlite MLflow DB with experiment "sweep-x": parent A (children: finished cell-1 (old), cell-2,
    failed cell-3) and parent B (children: finished cell-1 (newer re-run), cell-4)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from puregen_dist.tracking.mlflow_tracker import ensure_experiment

    tmp_path = tmp_path_factory.mktemp("sweep_db")
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    exp = ensure_experiment(uri, "sweep-x", tmp_path / "artifacts")
    ensure_experiment(uri, "other-exp", tmp_path / "artifacts")
    client = MlflowClient(uri)
    parents = {p: client.create_run(exp, start_time=1000 + i, run_name=p).info.run_id
               for i, p in enumerate(("A", "B"))}
    for run_id in parents.values():
        client.set_terminated(run_id)
    ids = {}

    def child(name: str, parent: str, cell: str, start: int, status: str = "FINISHED",
              nat: float = 0.9) -> None:
        tags = {"mlflow.parentRunId": parents[parent], "sweep": "sweep-x", "cell_id": cell, "row": "jpeg",
                "col": "badnets", "attack.kind": "triggered", "seed": "3", "target_class": "7",
                "classifier": "cnn"}
        run_id = client.create_run(exp, start_time=start, tags=tags, run_name=name).info.run_id
        client.log_batch(run_id, metrics=[Metric("nat_acc", 0.1, 0, 0), Metric("nat_acc", nat, 1, 1),
                                          Metric("poison_success_m1", 0.25, 1, 0)],
                         params=[Param("defense.name", "jpeg"), Param("seed", "3")],
                         tags=[RunTag("extra", "x")])
        client.set_terminated(run_id, status=status)
        ids[name] = run_id

    child("old1", "A", "cell-1", 2000, nat=0.5)
    child("c2", "A", "cell-2", 2100)
    child("failed3", "A", "cell-3", 2200, status="FAILED")
    child("new1", "B", "cell-1", 3000, nat=0.8)
    child("c4", "B", "cell-4", 3100)
    return uri, parents, ids


def _prefixed(line: pd.Series, prefix: str) -> dict[str, object]:
    """The non-missing ``<prefix>.*`` columns of one run, without the prefix."""
    return {k.removeprefix(prefix): v for k, v in line.items() if k.startswith(prefix) and not pd.isna(v)}


def test_fetch_runs_latest_per_cell_finished_children_only(sweep_db):
    uri, _, ids = sweep_db
    records = fetch_runs(uri, "sweep-x")
    assert records["run_id"].tolist() == [ids["c2"], ids["new1"], ids["c4"]]
    new1 = records.iloc[1]
    assert (new1["tags.cell_id"], new1["tags.row"], new1["tags.col"], new1["tags.attack.kind"]) == (
        "cell-1", "jpeg", "badnets", "triggered")
    assert (int(new1["tags.seed"]), int(new1["tags.target_class"])) == (3, 7)
    assert new1["start_time"] == pd.Timestamp(3000, unit="ms", tz="UTC")
    # latest value of the history
    assert _prefixed(new1, "metrics.") == {"nat_acc": 0.8, "poison_success_m1": 0.25}
    assert _prefixed(new1, "params.") == {"defense.name": "jpeg", "seed": "3"}


def test_fetch_runs_of_some_cells_only(sweep_db):
    uri, _, ids = sweep_db
    assert fetch_runs(uri, "sweep-x", cells={"cell-1", "nope"})["run_id"].tolist() == [ids["new1"]]
    with pytest.raises(UserInputError, match="among the 1 cells asked for"):
        fetch_runs(uri, "sweep-x", cells={"nope"})


def test_fetch_runs_of_one_parent(sweep_db):
    uri, parents, ids = sweep_db
    records = fetch_runs(uri, "sweep-x", parents["A"])
    assert records["run_id"].tolist() == [ids["old1"], ids["c2"]]
    assert records.iloc[0]["metrics.nat_acc"] == 0.5


def test_latest_per_cell_drops_runs_that_are_not_sweep_children():
    runs = golden_runs()
    not_child = runs.iloc[[0, 1]].copy()
    not_child["tags.mlflow.parentRunId"] = None  # e.g. the parent run itself
    not_child.loc[not_child.index[1], "tags.mlflow.parentRunId"] = PARENT
    not_child["tags.row"] = ["x", ""]  # a child without a row label
    mixed = pd.concat([runs, not_child.assign(run_id=["z1", "z2"])], ignore_index=True)
    assert latest_per_cell(mixed)["run_id"].tolist() == latest_per_cell(runs)["run_id"].tolist()
    assert len(latest_per_cell(runs)) == len(runs)  # every golden run is its own cell
    assert latest_per_cell(runs_frame([])).empty


def test_fetch_runs_user_errors(sweep_db, tmp_path):
    uri, _, _ = sweep_db
    with pytest.raises(UserInputError, match="'missing-exp'") as info:
        fetch_runs(uri, "missing-exp")
    assert "'sweep-x'" in str(info.value) and "'other-exp'" in str(info.value) and uri in str(info.value)
    with pytest.raises(UserInputError, match="no finished sweep child runs"):
        fetch_runs(uri, "other-exp")
    with pytest.raises(UserInputError, match="no MLflow database"):
        fetch_runs(f"sqlite:///{(tmp_path / 'nope' / 'mlflow.db').as_posix()}", "sweep-x")


def test_per_target_lines_average_seeds_in_table_order(tmp_path):
    lines = report.per_target(golden_runs())
    assert [(r, t) for r, t in zip(lines["row"], lines["target"], strict=True)] == [
        ("none", 0), ("none", 1), ("puregen_ebm", 0), ("puregen_ebm", 1)]  # triggered only, none first
    assert lines["poison_success_m1"].tolist() == pytest.approx([0.85, 0.55, 0.05, 0.25])
    assert lines["n"].tolist() == [2, 2, 2, 2]
    text = report.per_target_markdown(lines)
    assert "| none | badnets | 0 | 85.0 (—) | 100.0 (—) | 94.5 | 2 |" in text
    assert write_report(golden_runs(), tmp_path)["targets"].read_text() == text


def test_removal_table_averages_over_runs_in_table_order(tmp_path):
    runs = []
    for seed, (recall, precision, removed) in enumerate([(1.0, 0.5, 40.0), (0.5, 0.25, 20.0)]):
        removal_metrics = {"removal_recall": recall, "removal_precision": precision, "rows_removed": removed}
        runs.append(_record("spectral", "badnets", "triggered", seed, 0, {"nat_acc": 0.9, **removal_metrics}))
        runs.append(_record("none", "badnets", "triggered", seed, 0, {"nat_acc": 0.95}))
    frame = runs_frame(runs)
    lines = removal(frame)
    assert lines[["row", "col", "n"]].values.tolist() == [["spectral", "badnets", 2]]
    assert lines.loc[0, "removal_recall"] == 0.75 and lines.loc[0, "rows_removed"] == 30.0
    assert "| spectral | badnets | 75.0 | 37.5 | 30 | 2 |" in removal_markdown(lines)
    paths = write_report(frame, tmp_path)
    assert paths["removal"].read_text() == removal_markdown(lines)
    assert "removal" not in write_report(golden_runs(), tmp_path)  # nothing removed: the file goes
    assert not (tmp_path / "report_removal.md").exists()
