"""The paper's results table (defenses × attacks) from the MLflow child runs of a sweep.

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627, results tables: rows are defenses, columns
attacks, each cell the poison success and the natural accuracy of the classifier trained on the (purified)
data.

A sweep child run (written by the sweep trial, tag names in :mod:`puregen_dist.tracking.names`) is an MLflow
run with status FINISHED, tag ``mlflow.parentRunId`` and tags ``sweep``, ``cell_id``, ``row`` (defense label),
``col`` (attack label), ``attack.kind`` (``triggered``, ``triggerless``, ``availability`` or ``none``), ``seed``,
``target_class`` (triggered attacks) and ``classifier``; its params are the flattened experiment config
(``defense.name``, ``defense.langevin.steps``, ...) and its metrics ``nat_acc``, ``poison_success_m1``,
``poison_success_m3`` (triggered) and ``target_success`` (triggerless: 1.0 when the single target image is
classified as the adversarial label, else 0.0).

Statistics (per table cell, i.e. per (defense, attack) pair, over every run of the cell):

- mean ± std, where std is the sample standard deviation (ddof=1) when n > 1 and 0.0 for a single run;
- triggered attacks: also the max over target classes of the per-target-class mean poison success;
- triggerless attacks: the success rate with a 95% Wilson score interval.

Data flow: :func:`fetch_runs` reads the runs through :mod:`puregen_dist.tracking.reader` (the only MLflow
access, imported lazily there) as a DataFrame of MLflow's ``search_runs`` columns (``tags.row``,
``metrics.nat_acc``, ``params.defense.name``, ``start_time``, ``run_id``, ...); everything else is pandas
aggregation of such a DataFrame (:func:`latest_per_cell`, :func:`build_table`) and rendering (Markdown, CSV,
heatmap, Langevin-steps plot).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.typing import SeriesGroupBy

from puregen_dist.atomic import atomic_write_text
from puregen_dist.classifiers.evaluation import NAT_ACC_DEFINITION, POISON_SUCCESS_DEFINITION, wilson_interval
from puregen_dist.config.errors import UserInputError
from puregen_dist.plots import _new_figure, _save_png, write_csv
from puregen_dist.tracking.names import (
    AttackKind,
    Metric,
    Param,
    Tag,
    metric_column,
    param_column,
    tag_column,
)
from puregen_dist.tracking.reader import check_run_id, read_runs

log = logging.getLogger(__name__)

TRIGGERED, TRIGGERLESS, NO_ATTACK = AttackKind.TRIGGERED, AttackKind.TRIGGERLESS, AttackKind.NONE
ATTACK_KINDS = AttackKind.ALL
NO_DEFENSE = "none"
"""Row label of the undefended baseline: always the first row."""
NAT_ACC, POISON_M1, POISON_M3, TARGET_SUCCESS = (Metric.NAT_ACC, Metric.POISON_M1, Metric.POISON_M3,
                                                 Metric.TARGET_SUCCESS)
FLOORS = {"floor_m1_mean": Metric.FLOOR_M1, "floor_m3_mean": Metric.FLOOR_M3,
          "floor_target_rate": Metric.FLOOR_TARGET_SUCCESS}
"""Report statistic -> the floor metric it averages over a cell's runs (:mod:`puregen_dist.sweep.floors`)."""
FLOOR_DEFINITION = (
    "the same measurement (mean over the cell's runs) on the classifier trained on the clean training set with the "
    "same defense, classifier and seed (the row's attack-none cell): the triggered test images it already sends "
    "to the target class, or the share of targets it already classifies as the adversarial label"
)
TARGET_SUCCESS_DEFINITION = (
    "share of runs (trials, i.e. poison keys, × seeds) whose single target image is classified as the adversarial label, "
    "with a 95% Wilson score interval"
)
REQUIRED_TAGS = (Tag.CELL_ID, Tag.ROW, Tag.COL, Tag.ATTACK_KIND)
"""Tags without which a run with a parent run is not a sweep child run."""

REPORT_FILES = {
    "markdown": "report.md",
    "csv": "report.csv",
    "targets": "report_targets.md",
    "removal": "report_removal.md",
    "paper": "report_paper.md",
    "heatmap": "report_heatmap.png",
    "langevin_steps": "report_langevin_steps.png",
    "diffusion_steps": "report_diffusion_steps.png",
}
"""Key of :func:`write_report`'s result -> file name in the output directory."""

CSV_COLUMNS = (
    "row", "col", "attack_kind", "attack_name", "attack_eps", "defense_name", "defense_quality", "defense_steps",
    "n_runs",
    "nat_acc_mean", "nat_acc_std", "nat_acc_n",
    "poison_m1_mean", "poison_m1_std", "poison_m1_max_over_targets", "poison_m1_n", "poison_m1_n_targets",
    "poison_m3_mean", "poison_m3_std", "poison_m3_max_over_targets", "poison_m3_n", "poison_m3_n_targets",
    "target_success_rate", "target_success_successes", "target_success_n",
    "target_success_ci_low", "target_success_ci_high",
    "floor_m1_mean", "floor_m3_mean", "floor_target_rate",
)
"""Columns of :attr:`ReportTable.stats` and of :func:`to_csv_rows` (rates as fractions in [0, 1]); the
``attack_*`` / ``defense_*`` columns are the cell's params (its first run's) that place it in the paper's tables."""
COUNT_COLUMNS = [c for c in CSV_COLUMNS if c.endswith(("n_runs", "_n", "_n_targets", "_successes"))]
KEYS = ["row", "col"]


# ---------------------------------------------------------------------------------------- selecting runs


def fetch_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
               cells: Collection[str] | None = None) -> pd.DataFrame:
    """The finished sweep child runs of ``experiment``, one per ``cell_id`` (the latest by start time).

    Args:
        tracking_uri: MLflow tracking URI (e.g. ``sqlite:////abs/out/mlflow.db``).
        experiment: experiment name (the sweep name).
        parent_run_id: only the children of this sweep invocation; default: children of any invocation.
        cells: only these cell ids (the cells of one sweep file); default: every cell.

    Returns:
        MLflow's ``search_runs`` columns, one line per cell, oldest first (see :func:`latest_per_cell`).

    Raises:
        UserInputError: no database at a ``sqlite:///`` URI, no such experiment, a ``parent_run_id`` that is
            not a run id, or no matching runs.
    """
    if parent_run_id is not None:
        check_run_id(parent_run_id, "report --parent")  # pasted into an MLflow filter string: never unchecked
    latest = latest_per_cell(read_runs(tracking_uri, experiment, parent_run_id=parent_run_id))
    if cells is not None and not latest.empty:
        latest = latest[latest[tag_column(Tag.CELL_ID)].isin(set(cells))].reset_index(drop=True)
    if latest.empty:
        scope = f"parent run {parent_run_id}" if parent_run_id else "any parent run"
        scope += f", among the {len(cells)} cells asked for" if cells is not None else ""
        raise UserInputError(
            f"no finished sweep child runs (of {scope}) in MLflow experiment {experiment!r} at {tracking_uri}"
        )
    return latest


def latest_per_cell(runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep child runs among ``runs`` (a parent run and every tag of :data:`REQUIRED_TAGS` non-empty),
    one per ``cell_id``: the latest by (start time, run id); returned oldest first with a fresh index."""
    columns = [tag_column(t) for t in (Tag.PARENT_RUN_ID, *REQUIRED_TAGS)]
    if not set(columns) <= set(runs.columns):
        return runs.iloc[0:0]
    is_child = runs[columns].notna().all(axis=1) & (runs[columns[1:]] != "").all(axis=1)
    log.debug("%d of %d runs are not sweep child runs", int((~is_child).sum()), len(runs))
    ordered = runs[is_child].sort_values(["start_time", "run_id"], kind="stable")
    return ordered.drop_duplicates(tag_column(Tag.CELL_ID), keep="last").reset_index(drop=True)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name`` of ``runs``; all NaN when no run has it."""
    return runs[name] if name in runs.columns else pd.Series(None, index=runs.index, dtype=object)


def _tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """One line per run: ``row``, ``col``, ``kind``, ``target`` (a number or NaN), the report's metrics
    (NaN where absent or not finite), ``defense`` (param ``defense.name``, else the row) and the params that
    place a cell in the paper's tables (``defense_quality``, ``defense_steps``, ``attack_name``,
    ``attack_eps``; NaN if absent)."""
    defense = _column(runs, param_column(Param.DEFENSE_NAME))
    tidy = pd.DataFrame({
        "row": runs[tag_column(Tag.ROW)], "col": runs[tag_column(Tag.COL)],
        "kind": runs[tag_column(Tag.ATTACK_KIND)],
        "target": pd.to_numeric(_column(runs, tag_column(Tag.TARGET_CLASS)), errors="coerce"),
        "defense": defense.fillna(runs[tag_column(Tag.ROW)]),
        "defense_quality": pd.to_numeric(_column(runs, param_column(Param.DEFENSE_QUALITY)), errors="coerce"),
        "defense_steps": _purification_length(runs, defense),
        "attack_name": _column(runs, param_column(Param.ATTACK_NAME)),
        "attack_eps": pd.to_numeric(_column(runs, param_column(Param.ATTACK_EPS)), errors="coerce"),
    })
    for metric in (NAT_ACC, POISON_M1, POISON_M3, TARGET_SUCCESS, *FLOORS.values()):
        values = pd.to_numeric(_column(runs, metric_column(metric)), errors="coerce").astype(float)
        tidy[metric] = values.where(np.isfinite(values))
    return tidy


@dataclass(frozen=True)
class PurificationLength:
    """The param that sets a purifier's length and the paper's value of it (P App. D.2)."""

    param: str
    published: int


PURIFICATION_LENGTH = {"puregen_ebm": PurificationLength(Param.LANGEVIN_STEPS, 150),
                       "puregen_ddpm": PurificationLength(Param.DIFFUSION_STEPS, 75)}
"""Defense name -> its purification length: Langevin steps (150 in the paper's from-scratch rows), DDPM t (75)."""


def _purification_length(runs: pd.DataFrame, defense: pd.Series) -> pd.Series:
    """Per run, the purification length of its defense (:data:`PURIFICATION_LENGTH`: an EBM run's Langevin
    steps, a DDPM run's t; a DDPM run also records the unused Langevin default, which is ignored); NaN for other
    defenses or where not recorded."""
    length = pd.Series(np.nan, index=runs.index)
    for name, length_of in PURIFICATION_LENGTH.items():
        values = pd.to_numeric(_column(runs, param_column(length_of.param)), errors="coerce")
        length = length.where(defense != name, values)
    return length


# ------------------------------------------------------------------------------------------ aggregation


@dataclass(frozen=True)
class ReportTable:
    """Defenses (rows: ``none`` first, then first appearance) × attacks (columns: ``none``-kind attacks
    first, then first appearance).

    Attributes:
        rows: defense labels in table order.
        cols: attack labels in table order.
        stats: one line per (row, col) cell that has runs, in table order (row-major), columns
            :data:`CSV_COLUMNS`; NaN where a statistic does not apply or no run has the metric.
    """

    rows: list[str]
    cols: list[str]
    stats: pd.DataFrame

    def cell(self, row: str, col: str) -> pd.Series | None:
        """The statistics of one cell (index :data:`CSV_COLUMNS`), or None when it has no runs."""
        match = self.stats[(self.stats["row"] == row) & (self.stats["col"] == col)]
        return None if match.empty else match.iloc[0]


def build_table(runs: pd.DataFrame) -> ReportTable:
    """Aggregate ``runs`` (MLflow columns, e.g. :func:`fetch_runs`) into the defenses × attacks table (pure;
    see the module docstring).

    Raises:
        ValueError: no runs, or one attack column recorded with several attack kinds.
    """
    if runs.empty:
        raise ValueError("build_table needs at least one run")
    tidy = _tidy(runs)
    kinds = _attack_kind_per_col(tidy)
    rows = sorted(tidy["row"].drop_duplicates().tolist(), key=lambda r: r != NO_DEFENSE)  # stable sort
    cols = sorted(tidy["col"].drop_duplicates().tolist(), key=lambda c: kinds[c] != NO_ATTACK)
    groups = tidy.groupby(KEYS)
    stats = pd.concat([groups.size().rename("n_runs"), _summary(groups[NAT_ACC], "nat_acc"),
                       _triggered(tidy, POISON_M1, "poison_m1"), _triggered(tidy, POISON_M3, "poison_m3"),
                       _triggerless(tidy), groups[list(FLOORS.values())].mean().set_axis(list(FLOORS), axis=1),
                       groups[["attack_name", "attack_eps", "defense", "defense_quality",
                               "defense_steps"]].first().rename(
                           columns={"defense": "defense_name"})],
                      axis=1)
    cells = [(r, c) for r in rows for c in cols if (r, c) in stats.index]
    order = pd.MultiIndex.from_tuples(cells, names=KEYS)
    stats = stats.reindex(order).reset_index()
    stats["attack_kind"] = stats["col"].map(kinds)
    stats = stats.reindex(columns=list(CSV_COLUMNS)).astype({c: "Int64" for c in COUNT_COLUMNS})
    return ReportTable(rows, cols, stats)


def _attack_kind_per_col(tidy: pd.DataFrame) -> dict[str, str]:
    """Attack label -> its one attack kind; ValueError when a label was recorded with several."""
    kinds = tidy.groupby("col", sort=False)["kind"].unique()
    mixed = {col: sorted(k) for col, k in kinds.items() if len(k) > 1}
    if mixed:
        raise ValueError(f"attack columns recorded with several attack kinds: {mixed}")
    return {col: k[0] for col, k in kinds.items()}


def _summary(values: SeriesGroupBy, prefix: str) -> pd.DataFrame:
    """``<prefix>_mean``, ``_std`` (ddof=1; 0.0 for a single value) and ``_n`` of grouped ``values``;
    all NaN in groups without a value."""
    agg = values.agg(["mean", "std", "count"])
    has = agg["count"] > 0
    return pd.DataFrame({f"{prefix}_mean": agg["mean"], f"{prefix}_std": agg["std"].fillna(0.0).where(has),
                         f"{prefix}_n": agg["count"].where(has)})


def _triggered(tidy: pd.DataFrame, metric: str, prefix: str) -> pd.DataFrame:
    """Over the triggered runs: :func:`_summary` of ``metric`` plus ``<prefix>_max_over_targets`` (max over
    target classes of the per-target mean) and ``<prefix>_n_targets`` (target classes with a value)."""
    runs = tidy[tidy["kind"] == TRIGGERED]
    per_target = runs.groupby([*KEYS, "target"], dropna=False)[metric].mean()
    best = per_target.groupby(level=KEYS).agg(["max", "count"])
    summary = _summary(runs.groupby(KEYS)[metric], prefix)
    summary[f"{prefix}_max_over_targets"] = best["max"]
    summary[f"{prefix}_n_targets"] = best["count"].where(summary[f"{prefix}_n"] > 0)
    return summary


def _triggerless(tidy: pd.DataFrame) -> pd.DataFrame:
    """Over the triggerless runs with a ``target_success``: the success rate (a run succeeds when its value
    is >= 0.5), successes, n and the 95% Wilson interval, per cell."""
    runs = tidy[(tidy["kind"] == TRIGGERLESS) & tidy[TARGET_SUCCESS].notna()]
    counts = (runs[TARGET_SUCCESS] >= 0.5).groupby([runs["row"], runs["col"]]).agg(["sum", "count"])
    interval = [wilson_interval(int(k), int(n)) for k, n in zip(counts["sum"], counts["count"], strict=True)]
    return pd.DataFrame({
        "target_success_rate": counts["sum"] / counts["count"], "target_success_successes": counts["sum"],
        "target_success_n": counts["count"], "target_success_ci_low": [low for low, _ in interval],
        "target_success_ci_high": [high for _, high in interval],
    }, index=counts.index)


def per_target(runs: pd.DataFrame) -> pd.DataFrame:
    """Triggered attacks per target class: one line per (row, col, target) in table order with the mean over
    the cell's runs (seeds) of poison success at m = 1 and 3, their floors and natural accuracy, and the run
    count ``n``; empty when no triggered run has a target class."""
    tidy = _tidy(runs)
    tidy = tidy[(tidy["kind"] == TRIGGERED) & tidy["target"].notna()]
    metrics = [POISON_M1, POISON_M3, FLOORS["floor_m1_mean"], FLOORS["floor_m3_mean"], NAT_ACC]
    if tidy.empty:
        return pd.DataFrame(columns=[*KEYS, "target", *metrics, "n"])
    table = build_table(runs)
    groups = tidy.groupby([*KEYS, "target"])
    lines = groups[metrics].mean().join(groups.size().rename("n")).reset_index()
    order = {(r, c): i for i, (r, c) in enumerate(zip(table.stats["row"], table.stats["col"], strict=True))}
    lines["_order"] = [order[r, c] for r, c in zip(lines["row"], lines["col"], strict=True)]
    lines["target"] = lines["target"].astype(int)
    return lines.sort_values(["_order", "target"], kind="stable").drop(columns="_order").reset_index(drop=True)


def per_target_markdown(lines: pd.DataFrame) -> str:
    """:func:`per_target` as Markdown, percent (``—`` where a metric is absent)."""
    def pct(value: float) -> str:
        return "—" if pd.isna(value) else _pct(value)

    out = ["| defense | attack | target class | poison success m = 1 (floor) | m = 3 (floor) | natural accuracy | runs |",
           "|---|---|---|---|---|---|---|"]
    for _, line in lines.iterrows():
        out.append(f"| {_md_escape(line['row'])} | {_md_escape(line['col'])} | {line['target']} | "
                   f"{pct(line[POISON_M1])} ({pct(line[FLOORS['floor_m1_mean']])}) | "
                   f"{pct(line[POISON_M3])} ({pct(line[FLOORS['floor_m3_mean']])}) | {pct(line[NAT_ACC])} | "
                   f"{line['n']} |")
    return "\n".join(out) + "\n"


REMOVAL = (Metric.REMOVAL_RECALL, Metric.REMOVAL_PRECISION, Metric.ROWS_REMOVED)


def removal(runs: pd.DataFrame) -> pd.DataFrame:
    """Defenses that removed training rows (filters, EPIC): one line per (row, col) in table order with the mean
    over the cell's runs of removal recall, precision and rows removed, and the run count ``n``; empty when no
    run removed rows."""
    lines = pd.DataFrame({"row": runs[tag_column(Tag.ROW)], "col": runs[tag_column(Tag.COL)],
                          **{m: pd.to_numeric(_column(runs, metric_column(m)), errors="coerce") for m in REMOVAL}})
    lines = lines.dropna(subset=[Metric.REMOVAL_RECALL])
    if lines.empty:
        return pd.DataFrame(columns=[*KEYS, *REMOVAL, "n"])
    groups = lines.groupby(KEYS, sort=False)
    lines = groups[list(REMOVAL)].mean().join(groups.size().rename("n")).reset_index()
    order = {cell: i for i, cell in enumerate(zip(*(build_table(runs).stats[k] for k in KEYS), strict=True))}
    lines["_order"] = [order.get(cell, len(order)) for cell in zip(lines["row"], lines["col"], strict=True)]
    return lines.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def removal_markdown(lines: pd.DataFrame) -> str:
    """:func:`removal` as Markdown (percent; rows removed as a count)."""
    out = ["| defense | attack | poisons removed (recall) | removed rows that are poisons (precision) | "
           "rows removed | runs |", "|---|---|---|---|---|---|"]
    for _, line in lines.iterrows():
        out.append(f"| {_md_escape(line['row'])} | {_md_escape(line['col'])} | {_pct(line[Metric.REMOVAL_RECALL])} | "
                   f"{_pct(line[Metric.REMOVAL_PRECISION])} | {line[Metric.ROWS_REMOVED]:.0f} | {line['n']} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------- renderers


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def mean_std(cell: pd.Series, prefix: str) -> str:
    """``mean ± std`` in percent of the statistics ``<prefix>_mean`` / ``_std``; ``—`` when absent."""
    if pd.isna(cell[f"{prefix}_mean"]):
        return "—"
    return f"{_pct(cell[f'{prefix}_mean'])} ± {_pct(cell[f'{prefix}_std'])}"


def _floor(cell: pd.Series, column: str) -> str:
    """``, floor F`` (percent) when the cell has the floor statistic ``column``, else empty."""
    value = cell.get(column)
    return "" if value is None or pd.isna(value) else f", floor {_pct(value)}"


def attack_text(cell: pd.Series, magnification: int = 1) -> str:
    """The attack half of a cell in percent: ``ps ± std (max m, floor f)`` (triggered, at ``magnification``),
    ``rate [low, high] (floor f)`` (triggerless, 95% Wilson); ``—`` when the metric is absent."""
    if cell["attack_kind"] == TRIGGERED:
        prefix = "poison_m1" if magnification == 1 else "poison_m3"
        attack = mean_std(cell, prefix)
        if attack != "—":
            attack += f" (max {_pct(cell[f'{prefix}_max_over_targets'])}{_floor(cell, f'floor_m{magnification}_mean')})"
        return attack
    if pd.isna(cell.get("target_success_rate")):
        return "—"
    attack = (f"{_pct(cell['target_success_rate'])} [{_pct(cell['target_success_ci_low'])}, "
              f"{_pct(cell['target_success_ci_high'])}]")
    if floor := _floor(cell, "floor_target_rate"):
        attack += f" ({floor.removeprefix(', ')})"
    return attack


def format_cell(cell: pd.Series | None, magnification: int = 1) -> str:
    """One table cell (a line of :attr:`ReportTable.stats`) in percent: ``ps ± std (max m) / nat ± std``
    (triggered; ``(max m, floor f)`` when the clean classifier's floor was measured), ``rate [low, high] / nat ±
    std`` (triggerless, 95% Wilson; ``(floor f)``), ``nat ± std`` (no attack, or an
    availability attack, whose effect is the natural accuracy);
    ``—`` for a missing cell or metric."""
    if cell is None:
        return "—"
    nat = mean_std(cell, "nat_acc")
    if cell["attack_kind"] in (TRIGGERED, TRIGGERLESS):
        return f"{attack_text(cell, magnification)} / {nat}"
    return nat


def _markdown_grid(table: ReportTable, magnification: int, cols: list[str]) -> list[str]:
    """Header, separator and one line per defense of the ``cols`` columns."""
    header = ["defense \\ attack"] + [_md_escape(c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = [format_cell(table.cell(row, col), magnification) for col in cols]
        lines.append("| " + " | ".join([_md_escape(row)] + cells) + " |")
    return lines


def _md_escape(label: str) -> str:
    return label.replace("|", "\\|")


def _n_range(table: ReportTable) -> str:
    counts = sorted(set(table.stats["n_runs"].tolist()))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def to_markdown(table: ReportTable) -> str:
    """The table as Markdown (rows defenses, columns attacks, percent) with a caption stating the numbers;
    a second table of the triggered attacks at magnification m=3 when a run recorded ``poison_success_m3``."""
    lines = _markdown_grid(table, 1, table.cols)
    lines += [
        "",
        f"*Cells in percent, over the runs of each cell (target classes or trials × seeds; n = {_n_range(table)} "
        "runs per cell). Triggered attacks: poison success at m=1, mean ± std (max over target classes of "
        "the per-target mean) / natural accuracy mean ± std. Triggerless attacks: success rate [95% Wilson "
        "interval] / natural accuracy mean ± std. No attack: natural accuracy mean ± std. std is the sample "
        "std (ddof=1), 0.0 for a single run.*",
        "",
        f"- Poison success: {POISON_SUCCESS_DEFINITION}.",
        f"- Triggerless success: {TARGET_SUCCESS_DEFINITION}.",
        f"- Natural accuracy: {NAT_ACC_DEFINITION}.",
    ]
    if table.stats[list(FLOORS)].notna().any().any():
        lines.append(f"- Floor: {FLOOR_DEFINITION}.")
    m3 = set(table.stats.loc[table.stats["poison_m3_mean"].notna(), "col"])
    if m3:
        lines += ["", "Triggered attacks at trigger magnification m=3 (same statistics):", ""]
        lines += _markdown_grid(table, 3, [c for c in table.cols if c in m3])
    return "\n".join(lines) + "\n"


def to_csv_rows(table: ReportTable) -> list[dict[str, Any]]:
    """Long format: one dict per existing (row, col) cell in table order, keys :data:`CSV_COLUMNS`
    (None where a statistic does not apply; rates as fractions in [0, 1])."""
    lines = table.stats.to_dict("records")
    return [{k: None if pd.isna(v) else v for k, v in line.items()} for line in lines]


def read_stats_csv(path: str | Path) -> pd.DataFrame:
    """A ``report.csv`` written by :func:`write_report` read back as :attr:`ReportTable.stats` (same columns and
    dtypes; labels as strings), e.g. to render a committed report without its MLflow database."""
    try:
        stats = pd.read_csv(path, dtype={"row": str, "col": str, "attack_kind": str, "attack_name": str,
                                         "defense_name": str}, keep_default_na=False, na_values=[""])
    except (OSError, pd.errors.ParserError) as err:
        raise UserInputError(f"{path}: not a readable report CSV ({err})") from err
    missing = [c for c in CSV_COLUMNS if c not in stats.columns]
    if missing:
        raise UserInputError(f"{path}: not a report CSV, columns {missing} missing")
    return stats.reindex(columns=list(CSV_COLUMNS)).astype({c: "Int64" for c in COUNT_COLUMNS})


def heatmap_png(table: ReportTable, path: str | Path) -> Path:
    """Two heatmaps (rows defenses × columns attacks), each annotated and with a colorbar: mean poison success
    (m=1; triggerless: success rate) and mean natural accuracy, in percent; grey where not applicable."""
    stats = table.stats
    grids = {
        "poison success (%): triggered m=1, triggerless rate":
            _grid(table, stats["poison_m1_mean"].combine_first(stats["target_success_rate"])),
        "natural accuracy (%)": _grid(table, stats["nat_acc_mean"]),
    }
    width = 2 * (2.0 + 1.0 * len(table.cols)) + 0.5 + 0.08 * max(map(len, table.rows))
    figure = _new_figure(width=min(width, 40), height=min(1.6 + 0.5 * len(table.rows), 30))
    for ax, (title, grid), cmap in zip(figure.subplots(1, 2), grids.items(), ("Reds", "Blues"), strict=True):
        _draw_heatmap(figure, ax, grid, cmap, title, table)
    return _save_png(figure, path)


def _grid(table: ReportTable, values: pd.Series) -> np.ndarray:
    """(rows, cols) array in percent of ``values`` (aligned with ``table.stats``); NaN for missing cells."""
    frame = table.stats[KEYS].assign(value=values.astype(float))
    pivot = frame.pivot(index="row", columns="col", values="value")
    return pivot.reindex(index=table.rows, columns=table.cols).to_numpy(dtype=float) * 100


def _draw_heatmap(figure: Any, ax: Any, grid: np.ndarray, cmap_name: str, title: str,
                  table: ReportTable) -> None:
    """``grid`` (rows, cols) in percent as an annotated heatmap on ``ax`` (NaN grey), with a colorbar."""
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if math.isfinite(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="small",
                    color="white" if value > 60 else "black")
    ax.set_xticks(range(len(table.cols)), table.cols, rotation=30, ha="right", fontsize="small")
    ax.set_yticks(range(len(table.rows)), table.rows, fontsize="small")
    ax.set_title(title, fontsize="medium")
    ax.set(xlabel="attack", ylabel="defense")
    figure.colorbar(image, ax=ax, label="percent")


STEP_PLOTS = {"langevin_steps": (Param.LANGEVIN_STEPS, "Langevin steps"),
              "diffusion_steps": (Param.DIFFUSION_STEPS, "DDPM depth t (diffusion steps)")}
""":data:`REPORT_FILES` key -> (the purification-length param it plots against, its axis label)."""


def steps_curves(runs: pd.DataFrame, param: str = Param.LANGEVIN_STEPS) -> pd.DataFrame:
    """Over the runs with ``param`` (``defense.langevin.steps`` or ``defense.diffusion.steps``): one line per
    (``defense`` = param ``defense.name``, ``attack`` label, ``steps``) with the mean ``poison`` success (m=1;
    where no run has it: the mean ``target_success``), the mean ``poison_m3`` (NaN where not measured) and mean
    ``nat`` accuracy; (defense, attack) pairs in order of first appearance, only those run at two or more values
    of ``param`` (a DDPM run also records the unused Langevin default)."""
    tidy = _tidy(runs).rename(columns={"col": "attack"})
    tidy["steps"] = pd.to_numeric(_column(runs, param_column(param)), errors="coerce")
    tidy = tidy[tidy["steps"].notna()].astype({"steps": int})
    varied = tidy.groupby(["defense", "attack"], sort=False)["steps"].transform("nunique") >= 2
    grouped = tidy[varied].groupby(["defense", "attack", "steps"], sort=False)
    means = grouped[[POISON_M1, POISON_M3, TARGET_SUCCESS, NAT_ACC]].mean()
    curves = pd.DataFrame({"poison": means[POISON_M1].combine_first(means[TARGET_SUCCESS]),
                           "poison_m3": means[POISON_M3], "nat": means[NAT_ACC]})
    return curves.reset_index()


def steps_plot_png(runs: pd.DataFrame, path: str | Path, param: str = Param.LANGEVIN_STEPS,
                   label: str = "Langevin steps") -> bool:
    """Mean poison success (m=1, solid; m=3 dashed where measured; triggerless: success rate) and mean natural
    accuracy against ``param`` (:func:`steps_curves`), one colour per (``defense.name``, attack label), in two
    panels; x axis ``label``.

    Returns:
        False (nothing written) when no (defense, attack) pair was run at two or more values of ``param``.
    """
    curves = steps_curves(runs, param)
    if curves.empty:
        return False
    figure = _new_figure(width=11, height=4.4)
    poison_ax, nat_ax = figure.subplots(1, 2, sharex=True)
    for index, ((defense, attack), curve) in enumerate(curves.groupby(["defense", "attack"], sort=False)):
        curve = curve.sort_values("steps")
        style = {"marker": "o", "color": f"C{index % 10}", "label": f"{defense} / {attack}"}
        if curve["poison"].notna().any():
            poison_ax.plot(curve["steps"], curve["poison"] * 100, **style)
        if curve["poison_m3"].notna().any():
            poison_ax.plot(curve["steps"], curve["poison_m3"] * 100, **{**style, "linestyle": "--",
                                                                         "label": f"{style['label']} (m=3)"})
        nat_ax.plot(curve["steps"], curve["nat"] * 100, **style)
    poison_ax.set(title="poison success (m=1 solid, m=3 dashed)", xlabel=label, ylabel="poison success (%)")
    nat_ax.set(title="natural accuracy", xlabel=label, ylabel="natural accuracy (%)")
    for ax in (poison_ax, nat_ax):
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    nat_ax.legend(fontsize="small", loc="best")
    _save_png(figure, path)
    return True


# ---------------------------------------------------------------------------------------------- output


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_text(path, text)


def write_report(runs: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report_heatmap.png``, ``report_targets.md`` (triggered attacks per
    target class, when there are any), ``report_removal.md`` (defenses that removed rows, when any did) and, when a defense was run at several
    Langevin steps / DDPM depths, ``report_langevin_steps.png`` / ``report_diffusion_steps.png`` into
    ``out_dir`` (each atomically).

    A steps plot left in ``out_dir`` by an earlier report is removed when its steps do not vary, so every file
    there describes ``runs``.

    Returns:
        :data:`REPORT_FILES` key -> path written (the steps plots only when written).
    """
    out_dir = Path(out_dir)
    table = build_table(runs)
    paths = {
        "markdown": write_text(to_markdown(table), out_dir / REPORT_FILES["markdown"]),
        "csv": write_csv(to_csv_rows(table), out_dir / REPORT_FILES["csv"], CSV_COLUMNS),
        "heatmap": heatmap_png(table, out_dir / REPORT_FILES["heatmap"]),
    }
    for name, lines, render in (("targets", per_target(runs), per_target_markdown),
                                ("removal", removal(runs), removal_markdown)):
        path = out_dir / REPORT_FILES[name]
        if lines.empty:  # a file left by an earlier report would describe other runs
            path.unlink(missing_ok=True)
        else:
            paths[name] = write_text(render(lines), path)
    for name, (param, label) in STEP_PLOTS.items():
        steps_path = out_dir / REPORT_FILES[name]
        if steps_plot_png(runs, steps_path, param, label):
            paths[name] = steps_path
        else:
            steps_path.unlink(missing_ok=True)
    return paths


def render_report(tracking_uri: str, experiment: str, out_dir: str | Path, parent_run_id: str | None = None,
                  cells: Collection[str] | None = None) -> tuple[str, dict[str, Path]]:
    """:func:`fetch_runs`, then :func:`write_report`; returns (the Markdown table, the paths written)."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id, cells)
    return to_markdown(build_table(runs)), write_report(runs, out_dir)


__all__ = [
    "CSV_COLUMNS", "attack_text", "mean_std", "REPORT_FILES", "ReportTable", "build_table", "fetch_runs", "format_cell", "heatmap_png",
    "latest_per_cell", "per_target", "per_target_markdown", "removal", "removal_markdown", "read_stats_csv", "render_report", "steps_curves", "steps_plot_png", "to_csv_rows", "to_markdown",
    "write_report", "write_text",
]
