"""Pooling the same cells of several reports: exact moments, the pool of two sweeps' reports equals the report of
all their runs together, and bad specs refused with the file and key named."""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path

import pytest

from puregen_dist.cli import main
from puregen_dist.config.errors import UserInputError
from puregen_dist.sweep.pool import POOLED_REPORT, Moments, pool_moments, pooled_rows, read_pool_spec
from puregen_dist.sweep.report import build_table, write_report
from tests.unit.sweep.test_report import golden_runs


def _moments(values: list[float]) -> Moments:
    return Moments(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@pytest.mark.parametrize("sizes", [(1,), (3, 3), (1, 4, 2), (5, 1, 1, 6)])
def test_pooled_moments_are_those_of_the_concatenated_sample(sizes):
    rng = random.Random(sum(sizes))
    parts = [[rng.uniform(0, 1) for _ in range(n)] for n in sizes]
    whole = [v for part in parts for v in part]
    pooled = pool_moments([_moments(p) for p in parts] + [Moments(0, float("nan"), float("nan"))])
    assert pooled.n == len(whole)
    assert pooled.mean == pytest.approx(statistics.fmean(whole), abs=1e-12)
    assert pooled.std == pytest.approx(statistics.stdev(whole) if len(whole) > 1 else 0.0, abs=1e-12)


def test_pool_of_empty_parts_has_no_moments():
    assert pool_moments([]).n == 0


def _spec(tmp_path: Path, **override: object) -> Path:
    spec = {"kind": "pooled", "sources": {"seed 0": "../a", "seed 1": "../b"}, "baseline": "undefended",
            "rows": [{"label": "undefended", "cells": {"seed 0": ["none", "badnets"], "seed 1": ["none", "badnets"]}},
                     {"label": "EBM", "cells": {"seed 0": ["puregen_ebm", "badnets"],
                                                "seed 1": ["puregen_ebm", "badnets"]}}]}
    spec.update(override)
    path = tmp_path / "pool" / "source.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    return path


def test_pool_of_two_sweeps_equals_the_report_of_all_their_runs(tmp_path):
    runs = golden_runs()
    seeds = runs["tags.seed"]
    write_report(runs[seeds != "1"], tmp_path / "a")  # seed 0 (and the seed-less extras) in one sweep...
    write_report(runs[seeds == "1"], tmp_path / "b")  # ...seed 1 in a later one
    whole = build_table(runs)
    lines = {line["label"]: line for line in pooled_rows(read_pool_spec(_spec(tmp_path)))}
    for label, row in (("undefended", "none"), ("EBM", "puregen_ebm")):
        cell = whole.cell(row, "badnets")
        for prefix in ("poison_m1", "poison_m3"):
            pooled = lines[label][prefix]
            assert pooled.n == cell[f"{prefix}_n"] == 4
            assert pooled.mean == pytest.approx(cell[f"{prefix}_mean"], abs=1e-12)
            assert pooled.std == pytest.approx(cell[f"{prefix}_std"], abs=1e-12)
    assert lines["undefended"]["share"] == 1.0
    assert lines["EBM"]["share"] == pytest.approx(
        whole.cell("puregen_ebm", "badnets")["poison_m3_mean"] / whole.cell("none", "badnets")["poison_m3_mean"])


def test_pool_command_writes_the_table_beside_the_spec(tmp_path, capsys):
    runs = golden_runs()
    write_report(runs[runs["tags.seed"] != "1"], tmp_path / "a")
    write_report(runs[runs["tags.seed"] == "1"], tmp_path / "b")
    spec = _spec(tmp_path)
    assert main(["-q", "pool", str(spec)]) == 0
    table = (spec.parent / POOLED_REPORT).read_text()
    assert table in capsys.readouterr().out
    assert "| undefended | 95.0 | 85.0 | 90.0 ± 14.1 |" in table  # none m = 3: seed 0 (1.0, 0.9), seed 1 (1.0, 0.7)


@pytest.mark.parametrize("override, key", [
    ({"kind": "sweep"}, "kind"),
    ({"sources": {}}, "sources"),
    ({"sorces": {}}, "sorces"),
    ({"baseline": "nobody"}, "baseline"),
    ({"rows": [{"label": "x", "cells": {"seed 9": ["none", "badnets"]}}]}, "rows[0].cells.seed 9"),
    ({"rows": [{"label": "x", "cells": {"seed 0": ["none"]}}]}, "rows[0].cells.seed 0"),
])
def test_bad_specs_are_refused_naming_file_and_key(tmp_path, override, key):
    spec = _spec(tmp_path, **override)
    with pytest.raises(UserInputError, match=re.escape(f"source.json: key '{key}'")):
        read_pool_spec(spec)


def test_a_cell_missing_from_a_source_is_named(tmp_path, capsys):
    runs = golden_runs()
    write_report(runs, tmp_path / "a")
    write_report(runs[runs["tags.row"] == "none"], tmp_path / "b")
    assert main(["-q", "pool", str(_spec(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "row 'EBM', source 'seed 1': no cell ['puregen_ebm', 'badnets']" in err
    assert not (tmp_path / "pool" / POOLED_REPORT).exists()
