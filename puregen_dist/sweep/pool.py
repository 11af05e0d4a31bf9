"""Pool the same cells measured by several sweeps into one table.

A study often grows after its first sweep: more seeds for the rows that decide a claim, run later as a sweep of
their own (its own MLflow experiment and ``report.csv``). This module pools such cells: each pooled row names, per
source report, the (row, column) cell it takes, and the pooled statistics are those of all the sources' runs
together (mean and ddof-1 standard deviation recombined exactly from each cell's count, mean and std; no
re-rounding of the sources' Markdown).

The pool is described by a JSON file (``source.json`` with ``"kind": "pooled"``, written by hand beside the
published reports it pools) and rendered by ``puregen-dist pool SPEC`` into ``report_pooled.md`` next to it::

    {"kind": "pooled", "about": "what it pools, how to render it",
     "sources": {"seed 0": "../sweep_a", "seeds 1-2": "../sweep_b"},   # label -> report directory (relative)
     "baseline": "undefended",                                        # the row the shares are taken of
     "rows": [{"label": "undefended", "cells": {"seed 0": ["none", "narcissus"], "seeds 1-2": ["none", "narcissus"]}},
              {"label": "PureGen-EBM", "cells": {...}}]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from puregen_dist.config.errors import UserInputError
from puregen_dist.sweep.report import REPORT_FILES, read_stats_csv, write_text

POOLED_REPORT = "report_pooled.md"
"""File name of the rendered pool, beside its spec."""
POOLED_METRICS = {"poison_m3": "m = 3", "poison_m1": "m = 1", "nat_acc": "natural accuracy"}
"""report.csv statistic prefix -> column title, in table order."""


SPEC_KEYS = {"kind", "about", "sources", "baseline", "rows"}
"""Keys of a pool spec (``about``: free text for the reader, e.g. the command that renders it)."""


@dataclass(frozen=True)
class Moments:
    """Count, mean and ddof-1 standard deviation of a sample (std 0.0 for a single value)."""

    n: int
    mean: float
    std: float


def pool_moments(parts: list[Moments]) -> Moments:
    """The moments of the union of the samples ``parts`` describe.

    Mean M = Σ n_i m_i / N; variance S² = Σ [(n_i − 1) s_i² + n_i (m_i − M)²] / (N − 1) (exact for ddof-1
    standard deviations). Parts with n = 0 are ignored; all empty gives n = 0 and NaN moments.
    """
    parts = [p for p in parts if p.n > 0]
    total = sum(p.n for p in parts)
    if total == 0:
        return Moments(0, math.nan, math.nan)
    mean = sum(p.n * p.mean for p in parts) / total
    if total == 1:
        return Moments(1, mean, 0.0)
    squares = sum((p.n - 1) * p.std ** 2 + p.n * (p.mean - mean) ** 2 for p in parts)
    return Moments(total, mean, math.sqrt(squares / (total - 1)))


@dataclass(frozen=True)
class PoolSpec:
    """A parsed pool spec: source label -> report directory, the baseline row, and per pooled row its label and
    source label -> (report row, report column)."""

    path: Path
    sources: dict[str, Path]
    baseline: str
    rows: list[tuple[str, dict[str, tuple[str, str]]]]


def _require(condition: bool, path: Path, key: str, expected: str) -> None:
    if not condition:
        raise UserInputError(f"{path}: key {key!r}: expected {expected}")


def read_pool_spec(path: str | Path) -> PoolSpec:
    """Parse and check a pool spec (see the module docstring); every error names the file and the key."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: not a readable JSON pool spec ({err})") from err
    _require(isinstance(spec, dict) and spec.get("kind") == "pooled", path, "kind", '"pooled"')
    unknown = sorted(set(spec) - SPEC_KEYS)
    _require(not unknown, path, unknown[0] if unknown else "", f"only the keys {sorted(SPEC_KEYS)}")
    sources = spec.get("sources")
    _require(isinstance(sources, dict) and sources and all(isinstance(v, str) for v in sources.values()),
             path, "sources", "a non-empty object of label -> report directory")
    rows = spec.get("rows")
    _require(isinstance(rows, list) and rows, path, "rows", "a non-empty list")
    parsed = []
    for i, row in enumerate(rows):
        key = f"rows[{i}]"
        _require(isinstance(row, dict) and isinstance(row.get("label"), str) and isinstance(row.get("cells"), dict),
                 path, key, "an object with a string 'label' and an object 'cells'")
        cells = row["cells"]
        for source, cell in cells.items():
            _require(source in sources, path, f"{key}.cells.{source}", f"one of the sources {sorted(sources)}")
            _require(isinstance(cell, list) and len(cell) == 2 and all(isinstance(c, str) for c in cell),
                     path, f"{key}.cells.{source}", "[report row, report column]")
        parsed.append((row["label"], {s: (c[0], c[1]) for s, c in cells.items()}))
    labels = [label for label, _ in parsed]
    _require(len(set(labels)) == len(labels), path, "rows", "distinct labels")
    _require(spec.get("baseline") in labels, path, "baseline", f"one of the row labels {labels}")
    return PoolSpec(path, {k: path.parent / v for k, v in sources.items()}, spec["baseline"], parsed)


def _source_stats(spec: PoolSpec) -> dict[str, pd.DataFrame]:
    """Each source's ``report.csv``, indexed by (row, col)."""
    stats = {}
    for label, directory in spec.sources.items():
        csv = directory / REPORT_FILES["csv"]
        if not csv.is_file():
            raise UserInputError(f"{spec.path}: source {label!r}: no {REPORT_FILES['csv']} in {directory}")
        stats[label] = read_stats_csv(csv).set_index(["row", "col"])
    return stats


def _cell(stats: dict[str, pd.DataFrame], spec: PoolSpec, label: str, source: str,
          cell: tuple[str, str]) -> pd.Series:
    """The statistics of report cell ``cell`` (row, column) in ``source``; an error names the pooled row."""
    table = stats[source]
    if cell not in table.index:
        raise UserInputError(f"{spec.path}: row {label!r}, source {source!r}: no cell {list(cell)} in "
                             f"{spec.sources[source] / REPORT_FILES['csv']}")
    return table.loc[cell]


def _moments(cell: pd.Series, prefix: str) -> Moments:
    n = cell[f"{prefix}_n"]
    if pd.isna(n) or n == 0:
        return Moments(0, math.nan, math.nan)
    return Moments(int(n), float(cell[f"{prefix}_mean"]), float(cell[f"{prefix}_std"]))


def pooled_rows(spec: PoolSpec) -> list[dict[str, object]]:
    """Per pooled row: ``label``, per source its m = 3 :class:`Moments` (``by_source``), the pooled
    :class:`Moments` of each :data:`POOLED_METRICS` prefix, and ``share``: pooled m = 3 / the baseline's."""
    stats = _source_stats(spec)
    lines = []
    for label, cells in spec.rows:
        found = {s: _cell(stats, spec, label, s, cell) for s, cell in cells.items()}
        by_source = {s: _moments(found[s], "poison_m3") for s in found}
        pooled = {p: pool_moments([_moments(c, p) for c in found.values()]) for p in POOLED_METRICS}
        lines.append({"label": label, "by_source": by_source, **pooled})
    base = next(line for line in lines if line["label"] == spec.baseline)["poison_m3"]
    for line in lines:
        line["share"] = line["poison_m3"].mean / base.mean if base.mean else math.nan
    return lines


def _pct(m: Moments, std: bool = True) -> str:
    if m.n == 0:
        return "—"
    return f"{100 * m.mean:.1f} ± {100 * m.std:.1f}" if std else f"{100 * m.mean:.1f}"


def pooled_markdown(spec: PoolSpec) -> str:
    """The pool as Markdown: per row the m = 3 poison success of each source, then the pooled m = 3, m = 1 and
    natural accuracy (percent, mean ± std over all runs), the run count and the share of the baseline's m = 3."""
    sources = list(spec.sources)
    head = ["defense", *[f"m = 3, {s}" for s in sources], *[f"{t}, pooled" for t in POOLED_METRICS.values()],
            "runs", f"m = 3 / {spec.baseline}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in pooled_rows(spec):
        cells = [line["label"],
                 *[_pct(line["by_source"][s], std=False) if s in line["by_source"] else "—" for s in sources],
                 *[_pct(line[p]) for p in POOLED_METRICS], str(line["poison_m3"].n),
                 "—" if math.isnan(line["share"]) else f"{line['share']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    note = ("*Percent; each source column is that report's mean over its runs (target classes × seeds); pooled: "
            "mean ± std (ddof 1) over every source's runs together, recombined exactly from the reports' "
            "report.csv.*")
    return "\n".join(out) + "\n\n" + note + "\n"


def render_pool(spec_path: str | Path) -> tuple[str, Path]:
    """Read the spec, write ``report_pooled.md`` beside it (atomically); returns (Markdown, path)."""
    spec = read_pool_spec(spec_path)
    markdown = pooled_markdown(spec)
    return markdown, write_text(markdown, spec.path.parent / POOLED_REPORT)


__all__ = ["Moments", "POOLED_REPORT", "PoolSpec", "pool_moments", "pooled_markdown", "pooled_rows",
           "read_pool_spec", "render_pool"]
