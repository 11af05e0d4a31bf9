"""The paper's results table (defenses × attacks) from the MLflow child runs of a sweep.

Paper: Bhat et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model
Dynamics" (NeurIPS 2024), https://arxiv.org/abs/2405.18627, results tables: rows are defenses, columns
attacks, each cell the poison success and the natural accuracy of the classifier trained on the (purified)
data.

A sweep child run (written by the sweep trial) is an MLflow run with status FINISHED, tag
``mlflow.parentRunId`` and tags ``sweep``, ``cell_id``, ``row`` (defense label), ``col`` (attack label),
``attack.kind`` (``triggered``, ``triggerless`` or ``none``), ``seed``, ``target_class`` (triggered attacks)
and ``classifier``; its params are the flattened experiment config (``defense.name``,
``defense.langevin.steps``, ...) and its metrics ``nat_acc``, ``poison_success_m1``, ``poison_success_m3``
(triggered) and ``target_success`` (triggerless: 1.0 when the single target image is classified as the
adversarial label, else 0.0).

Statistics (per table cell, i.e. per (defense, attack) pair, over every run of the cell):

- mean ± std, where std is the sample standard deviation (ddof=1) when n > 1 and 0.0 for a single run;
- triggered attacks: also the max over target classes of the per-target-class mean poison success;
- triggerless attacks: the success rate with a 95% Wilson score interval.

Only :func:`fetch_runs` touches MLflow (imported lazily); the rest is pure and imports without it.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from puregen_dist.classifiers.evaluation import NAT_ACC_DEFINITION, POISON_SUCCESS_DEFINITION, wilson_interval
from puregen_dist.config.errors import UserInputError
from puregen_dist.plots import _atomic_write, _new_figure, _save_png, write_csv

log = logging.getLogger(__name__)

TRIGGERED, TRIGGERLESS, NO_ATTACK = "triggered", "triggerless", "none"
ATTACK_KINDS = (TRIGGERED, TRIGGERLESS, NO_ATTACK)
NO_DEFENSE = "none"
"""Row label of the undefended baseline: always the first row."""

NAT_ACC, POISON_M1, POISON_M3 = "nat_acc", "poison_success_m1", "poison_success_m3"
TARGET_SUCCESS = "target_success"
STEPS_PARAM = "defense.langevin.steps"
TARGET_SUCCESS_DEFINITION = (
    "share of runs (targets × seeds) whose single target image is classified as the adversarial label, "
    "with a 95% Wilson score interval"
)
REQUIRED_TAGS = ("cell_id", "row", "col", "attack.kind")

REPORT_FILES = {
    "markdown": "report.md",
    "csv": "report.csv",
    "heatmap": "report_heatmap.png",
    "langevin_steps": "report_langevin_steps.png",
}
"""Key of :func:`write_report`'s result -> file name in the output directory."""


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RunRecord:
    """One finished sweep child run.

    Attributes:
        row: defense label (table row), e.g. ``puregen_ebm (langevin.steps=150)``.
        col: attack label (table column), e.g. ``badnets``.
        attack_kind: ``triggered``, ``triggerless`` or ``none``.
        seed: the run's seed (None when the run did not record one).
        target_class: target class of a triggered attack, else None.
        metrics: metric name -> latest value (e.g. ``nat_acc`` in [0, 1]).
        params: flattened config key (dotted) -> value as logged (a string).
        cell_id: the sweep cell, unique per (row, col, seed, target, ...) of a sweep.
        run_id: MLflow run id.
        start_time: MLflow start time, milliseconds since the epoch.
    """

    row: str
    col: str
    attack_kind: str
    seed: int | None
    target_class: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    cell_id: str = ""
    run_id: str = ""
    start_time: int = 0


def fetch_runs(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> list[RunRecord]:
    """The finished sweep child runs of ``experiment``, one per ``cell_id`` (the latest by start time).

    Args:
        tracking_uri: MLflow tracking URI (e.g. ``sqlite:////abs/out/mlflow.db``).
        experiment: experiment name (the sweep name).
        parent_run_id: only the children of this sweep invocation; default: children of any invocation.

    Returns:
        Records in start-time order (oldest first). Runs that are not FINISHED, have no parent run, or lack
        one of the tags ``cell_id``, ``row``, ``col``, ``attack.kind`` are left out.

    Raises:
        UserInputError: no database at a ``sqlite:///`` URI, no such experiment, or no matching runs.
    """
    from mlflow.tracking import MlflowClient

    _check_sqlite_exists(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise UserInputError(
            f"no MLflow experiment named {experiment!r} at {tracking_uri}"
            f"{' (it was deleted)' if found is not None else ''}; existing experiments: "
            f"{', '.join(map(repr, names)) or 'none'}"
        )
    filters = ["attributes.status = 'FINISHED'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs = _search_all(client, found.experiment_id, " AND ".join(filters))
    records = [r for r in (_to_record(run) for run in runs) if r is not None]
    latest = _latest_per_cell(records)
    if not latest:
        scope = f"parent run {parent_run_id}" if parent_run_id else "any parent run"
        raise UserInputError(
            f"no finished sweep child runs (of {scope}) in MLflow experiment {experiment!r} at {tracking_uri}"
        )
    return latest


def _check_sqlite_exists(tracking_uri: str) -> None:
    """MlflowClient would silently create an empty database at a mistyped sqlite path."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise UserInputError(f"no MLflow database at {db} (tracking URI {tracking_uri})")


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    """Every run matching ``filter_string`` (all result pages)."""
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _to_record(run: Any) -> RunRecord | None:
    """A :class:`RunRecord` of an MLflow run, or None when it is not a sweep child run."""
    tags = run.data.tags
    missing = [t for t in REQUIRED_TAGS if not tags.get(t)]
    if "mlflow.parentRunId" not in tags or missing:
        log.debug("run %s is not a sweep child run (missing tags: %s)", run.info.run_id, missing)
        return None
    params = dict(run.data.params)
    return RunRecord(
        row=tags["row"], col=tags["col"], attack_kind=tags["attack.kind"],
        seed=_parse_int(tags.get("seed", params.get("seed"))),
        target_class=_parse_int(tags.get("target_class")),
        metrics={k: float(v) for k, v in run.data.metrics.items()}, params=params,
        cell_id=tags["cell_id"], run_id=run.info.run_id, start_time=int(run.info.start_time or 0),
    )


def _parse_int(value: str | None) -> int | None:
    """``"3"`` or ``"3.0"`` -> 3; None, empty or ``"null"`` -> None."""
    if value is None or value.strip() in ("", "null", "None"):
        return None
    return int(float(value))


def _latest_per_cell(records: Iterable[RunRecord]) -> list[RunRecord]:
    """One record per ``cell_id``: the latest by start time; returned oldest first."""
    latest: dict[str, RunRecord] = {}
    for record in records:
        kept = latest.get(record.cell_id)
        if kept is None or (record.start_time, record.run_id) > (kept.start_time, kept.run_id):
            latest[record.cell_id] = record
    return sorted(latest.values(), key=lambda r: (r.start_time, r.run_id))


# ----------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Summary:
    """Mean and sample std (ddof=1; 0.0 when n == 1) of n values in [0, 1]."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class TriggeredSummary:
    """Poison success of a triggered attack at one magnification, over every run (targets × seeds).

    Attributes:
        mean, std, n: over all runs of the cell (std: ddof=1, 0.0 for a single run).
        max_over_targets: max over target classes of the mean over that target's runs (seeds).
        n_targets: distinct target classes.
    """

    mean: float
    std: float
    n: int
    max_over_targets: float
    n_targets: int


@dataclass(frozen=True)
class TriggerlessSummary:
    """Triggerless success rate = successes / n over runs (targets × seeds; a run succeeds when its
    ``target_success`` is >= 0.5), with its 95% Wilson interval."""

    rate: float
    successes: int
    n: int
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class CellStats:
    """Statistics of one (defense row, attack column) cell; absent metrics are None."""

    row: str
    col: str
    attack_kind: str
    n_runs: int
    nat_acc: Summary | None
    poison_m1: TriggeredSummary | None = None
    poison_m3: TriggeredSummary | None = None
    triggerless: TriggerlessSummary | None = None


@dataclass(frozen=True)
class ReportTable:
    """Defenses (rows: ``none`` first, then first appearance) × attacks (columns: ``none``-kind attacks
    first, then first appearance); ``cells[(row, col)]`` exists only where there are runs."""

    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], CellStats]

    def cell(self, row: str, col: str) -> CellStats | None:
        return self.cells.get((row, col))


def build_table(runs: Sequence[RunRecord]) -> ReportTable:
    """Aggregate ``runs`` into the defenses × attacks table (pure; see the module docstring).

    Raises:
        ValueError: no runs, or one attack column recorded with several attack kinds.
    """
    if not runs:
        raise ValueError("build_table needs at least one run")
    kinds = _attack_kind_per_col(runs)
    rows = _ordered(r.row for r in runs)
    if NO_DEFENSE in rows:
        rows = [NO_DEFENSE] + [r for r in rows if r != NO_DEFENSE]
    cols = _ordered(r.col for r in runs)
    cols = [c for c in cols if kinds[c] == NO_ATTACK] + [c for c in cols if kinds[c] != NO_ATTACK]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.row, run.col), []).append(run)
    cells = {key: _cell_stats(key[0], key[1], kinds[key[1]], group) for key, group in groups.items()}
    return ReportTable(rows, cols, cells)


def _ordered(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def _attack_kind_per_col(runs: Sequence[RunRecord]) -> dict[str, str]:
    kinds: dict[str, set[str]] = {}
    for run in runs:
        kinds.setdefault(run.col, set()).add(run.attack_kind)
    mixed = {col: sorted(k) for col, k in kinds.items() if len(k) > 1}
    if mixed:
        raise ValueError(f"attack columns recorded with several attack kinds: {mixed}")
    return {col: next(iter(k)) for col, k in kinds.items()}


def _cell_stats(row: str, col: str, kind: str, runs: Sequence[RunRecord]) -> CellStats:
    nat = summarize(_values(runs, NAT_ACC))
    if kind == TRIGGERED:
        m1, m3 = _triggered(runs, POISON_M1), _triggered(runs, POISON_M3)
        return CellStats(row, col, kind, len(runs), nat, m1, m3)
    if kind == TRIGGERLESS:
        return CellStats(row, col, kind, len(runs), nat, triggerless=_triggerless(runs))
    return CellStats(row, col, kind, len(runs), nat)


def _values(runs: Iterable[RunRecord], metric: str) -> list[float]:
    """The finite values of ``metric`` among ``runs`` (runs without it are left out)."""
    return [r.metrics[metric] for r in runs if metric in r.metrics and math.isfinite(r.metrics[metric])]


def summarize(values: Sequence[float]) -> Summary | None:
    """Mean and sample std (ddof=1; 0.0 for a single value) of ``values``; None when empty."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, len(values))


def _triggered(runs: Sequence[RunRecord], metric: str) -> TriggeredSummary | None:
    overall = summarize(_values(runs, metric))
    if overall is None:
        return None
    per_target: dict[int | None, list[float]] = {}
    for run in runs:
        if metric in run.metrics and math.isfinite(run.metrics[metric]):
            per_target.setdefault(run.target_class, []).append(run.metrics[metric])
    best = max(statistics.fmean(v) for v in per_target.values())
    return TriggeredSummary(overall.mean, overall.std, overall.n, best, len(per_target))


def _triggerless(runs: Sequence[RunRecord]) -> TriggerlessSummary | None:
    outcomes = _values(runs, TARGET_SUCCESS)
    if not outcomes:
        return None
    successes = sum(1 for v in outcomes if v >= 0.5)
    low, high = wilson_interval(successes, len(outcomes))
    return TriggerlessSummary(successes / len(outcomes), successes, len(outcomes), low, high)


# ------------------------------------------------------------------------------------------- renderers


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _mean_std(summary: Summary | TriggeredSummary) -> str:
    return f"{_pct(summary.mean)} ± {_pct(summary.std)}"


def format_cell(cell: CellStats | None, magnification: int = 1) -> str:
    """One table cell in percent: ``ps ± std (max m) / nat ± std`` (triggered),
    ``rate [low, high] / nat ± std`` (triggerless, 95% Wilson), ``nat ± std`` (no attack);
    ``—`` for a missing cell or metric."""
    if cell is None:
        return "—"
    nat = _mean_std(cell.nat_acc) if cell.nat_acc else "—"
    if cell.attack_kind == TRIGGERED:
        poison = cell.poison_m1 if magnification == 1 else cell.poison_m3
        attack = f"{_mean_std(poison)} (max {_pct(poison.max_over_targets)})" if poison else "—"
        return f"{attack} / {nat}"
    if cell.attack_kind == TRIGGERLESS:
        tl = cell.triggerless
        attack = f"{_pct(tl.rate)} [{_pct(tl.ci_low)}, {_pct(tl.ci_high)}]" if tl else "—"
        return f"{attack} / {nat}"
    return nat


def _markdown_grid(table: ReportTable, magnification: int, cols: Sequence[str]) -> list[str]:
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
    counts = sorted({c.n_runs for c in table.cells.values()})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def to_markdown(table: ReportTable) -> str:
    """The table as Markdown (rows defenses, columns attacks, percent) with a caption stating the numbers;
    a second table of the triggered attacks at magnification m=3 when a run recorded ``poison_success_m3``."""
    lines = _markdown_grid(table, 1, table.cols)
    lines += [
        "",
        f"*Cells in percent, over the runs of each cell (target classes × seeds; n = {_n_range(table)} "
        "runs per cell). Triggered attacks: poison success at m=1, mean ± std (max over target classes of "
        "the per-target mean) / natural accuracy mean ± std. Triggerless attacks: success rate [95% Wilson "
        "interval] / natural accuracy mean ± std. No attack: natural accuracy mean ± std. std is the sample "
        "std (ddof=1), 0.0 for a single run.*",
        "",
        f"- Poison success: {POISON_SUCCESS_DEFINITION}.",
        f"- Triggerless success: {TARGET_SUCCESS_DEFINITION}.",
        f"- Natural accuracy: {NAT_ACC_DEFINITION}.",
    ]
    m3_cols = _ordered(c.col for c in table.cells.values() if c.poison_m3 is not None)
    if m3_cols:
        m3_cols = [c for c in table.cols if c in m3_cols]
        lines += ["", "Triggered attacks at trigger magnification m=3 (same statistics):", ""]
        lines += _markdown_grid(table, 3, m3_cols)
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "row", "col", "attack_kind", "n_runs",
    "nat_acc_mean", "nat_acc_std", "nat_acc_n",
    "poison_m1_mean", "poison_m1_std", "poison_m1_max_over_targets", "poison_m1_n", "poison_m1_n_targets",
    "poison_m3_mean", "poison_m3_std", "poison_m3_max_over_targets", "poison_m3_n", "poison_m3_n_targets",
    "target_success_rate", "target_success_successes", "target_success_n",
    "target_success_ci_low", "target_success_ci_high",
)
"""Columns of :func:`to_csv_rows` (rates as fractions in [0, 1], not percent)."""


def to_csv_rows(table: ReportTable) -> list[dict[str, Any]]:
    """Long format: one dict per existing (row, col) cell in table order, keys :data:`CSV_COLUMNS`
    (None where a statistic does not apply; rates as fractions in [0, 1])."""
    out = []
    for row in table.rows:
        for col in table.cols:
            cell = table.cell(row, col)
            if cell is None:
                continue
            line: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
            line.update(row=row, col=col, attack_kind=cell.attack_kind, n_runs=cell.n_runs)
            if cell.nat_acc:
                nat = cell.nat_acc
                line.update(nat_acc_mean=nat.mean, nat_acc_std=nat.std, nat_acc_n=nat.n)
            for prefix, poison in (("poison_m1", cell.poison_m1), ("poison_m3", cell.poison_m3)):
                if poison:
                    line.update({f"{prefix}_mean": poison.mean, f"{prefix}_std": poison.std,
                                 f"{prefix}_max_over_targets": poison.max_over_targets,
                                 f"{prefix}_n": poison.n, f"{prefix}_n_targets": poison.n_targets})
            if cell.triggerless:
                tl = cell.triggerless
                line.update(target_success_rate=tl.rate, target_success_successes=tl.successes,
                            target_success_n=tl.n, target_success_ci_low=tl.ci_low,
                            target_success_ci_high=tl.ci_high)
            out.append(line)
    return out


def _attack_rate(cell: CellStats | None) -> float:
    """Poison success at m=1 (triggered) or triggerless success rate; NaN when not applicable."""
    if cell is not None and cell.poison_m1 is not None:
        return cell.poison_m1.mean
    if cell is not None and cell.triggerless is not None:
        return cell.triggerless.rate
    return math.nan


def heatmap_png(table: ReportTable, path: str | Path) -> Path:
    """Two heatmaps (rows defenses × columns attacks), each annotated and with a colorbar: mean poison success
    (m=1; triggerless: success rate) and mean natural accuracy, in percent; grey where not applicable."""
    grids = {
        "poison success (%): triggered m=1, triggerless rate": _grid(table, _attack_rate),
        "natural accuracy (%)": _grid(table, _nat_mean),
    }
    width = 2 * (2.0 + 1.0 * len(table.cols)) + 0.5 + 0.08 * max(map(len, table.rows))
    figure = _new_figure(width=min(width, 40), height=min(1.6 + 0.5 * len(table.rows), 30))
    for ax, (title, grid), cmap in zip(figure.subplots(1, 2), grids.items(), ("Reds", "Blues"), strict=True):
        _draw_heatmap(figure, ax, grid, cmap, title, table)
    return _save_png(figure, path)


def _grid(table: ReportTable, statistic: Callable[[CellStats | None], float]) -> np.ndarray:
    """(rows, cols) array of ``statistic`` per cell, in percent."""
    return np.array([[statistic(table.cell(r, c)) for c in table.cols] for r in table.rows]) * 100


def _nat_mean(cell: CellStats | None) -> float:
    return cell.nat_acc.mean if cell is not None and cell.nat_acc is not None else math.nan


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


def steps_plot_png(runs: Sequence[RunRecord], path: str | Path) -> bool:
    """Mean poison success (m=1; triggerless: success rate) and mean natural accuracy against Langevin steps
    (param ``defense.langevin.steps``), one line per (``defense.name``, attack label), in two panels.

    Returns:
        False (nothing written) when fewer than two distinct step counts occur among the runs with that param.
    """
    curves = _steps_curves(runs)
    if len({s for points in curves.values() for s in points}) < 2:
        return False
    figure = _new_figure(width=11, height=4.4)
    poison_ax, nat_ax = figure.subplots(1, 2, sharex=True)
    for index, ((defense, attack), points) in enumerate(curves.items()):
        steps = sorted(points)
        style = {"marker": "o", "color": f"C{index % 10}", "label": f"{defense} / {attack}"}
        poison = [_mean_or_nan(points[s], (POISON_M1, TARGET_SUCCESS)) * 100 for s in steps]
        nat = [_mean_or_nan(points[s], (NAT_ACC,)) * 100 for s in steps]
        if not all(math.isnan(v) for v in poison):
            poison_ax.plot(steps, poison, **style)
        nat_ax.plot(steps, nat, **style)
    poison_ax.set(title="poison success (m=1)", xlabel="Langevin steps", ylabel="poison success (%)")
    nat_ax.set(title="natural accuracy", xlabel="Langevin steps", ylabel="natural accuracy (%)")
    for ax in (poison_ax, nat_ax):
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    nat_ax.legend(fontsize="small", loc="best")
    _save_png(figure, path)
    return True


def _steps_curves(runs: Sequence[RunRecord]) -> dict[tuple[str, str], dict[int, list[RunRecord]]]:
    """(defense name, attack label) -> Langevin steps -> runs, over the runs that have
    ``defense.langevin.steps``."""
    curves: dict[tuple[str, str], dict[int, list[RunRecord]]] = {}
    for run in runs:
        steps = _parse_int(run.params.get(STEPS_PARAM))
        if steps is None:
            continue
        key = (run.params.get("defense.name", run.row), run.col)
        curves.setdefault(key, {}).setdefault(steps, []).append(run)
    return curves


def _mean_or_nan(runs: Sequence[RunRecord], metrics: Sequence[str]) -> float:
    """Mean of the first of ``metrics`` that some run has; NaN when none has any."""
    for metric in metrics:
        values = _values(runs, metric)
        if values:
            return statistics.fmean(values)
    return math.nan


# ---------------------------------------------------------------------------------------------- output


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) atomically."""

    def write(handle: IO[str]) -> None:
        handle.write(text)

    return _atomic_write(path, write, text=True)


def write_report(runs: Sequence[RunRecord], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report_heatmap.png`` and, when Langevin steps vary,
    ``report_langevin_steps.png`` into ``out_dir`` (each atomically).

    A ``report_langevin_steps.png`` left in ``out_dir`` by an earlier report is removed when the steps do not
    vary, so every file there describes ``runs``.

    Returns:
        :data:`REPORT_FILES` key -> path written (``langevin_steps`` only when written).
    """
    out_dir = Path(out_dir)
    table = build_table(runs)
    paths = {
        "markdown": write_text(to_markdown(table), out_dir / REPORT_FILES["markdown"]),
        "csv": write_csv(to_csv_rows(table), out_dir / REPORT_FILES["csv"], CSV_COLUMNS),
        "heatmap": heatmap_png(table, out_dir / REPORT_FILES["heatmap"]),
    }
    steps_path = out_dir / REPORT_FILES["langevin_steps"]
    if steps_plot_png(runs, steps_path):
        paths["langevin_steps"] = steps_path
    else:
        steps_path.unlink(missing_ok=True)
    return paths


def render_report(tracking_uri: str, experiment: str, out_dir: str | Path,
                  parent_run_id: str | None = None) -> tuple[str, dict[str, Path]]:
    """:func:`fetch_runs`, then :func:`write_report`; returns (the Markdown table, the paths written)."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id)
    return to_markdown(build_table(runs)), write_report(runs, out_dir)


__all__ = [
    "CSV_COLUMNS", "CellStats", "REPORT_FILES", "ReportTable", "RunRecord", "Summary", "TriggeredSummary",
    "TriggerlessSummary", "build_table", "fetch_runs", "format_cell", "heatmap_png", "render_report",
    "steps_plot_png", "summarize", "to_csv_rows", "to_markdown", "write_report", "write_text",
]
