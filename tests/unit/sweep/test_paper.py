"""The report beside the paper's published cells (puregen_dist.sweep.paper), and the report CSV read back."""

from __future__ import annotations

import pandas as pd
import pytest

from puregen_dist.config.errors import UserInputError
from puregen_dist.sweep.paper import attack_key, paper_cells, paper_comparison
from puregen_dist.sweep.report import build_table, format_cell, read_stats_csv, write_report
from tests.unit.sweep.test_report import golden_runs


def cell(defense: str, attack: str | None, eps: float | None = None, quality: float | None = None,
         steps: float | None = None) -> pd.Series:
    nan = float("nan")
    return pd.Series({"defense_name": defense, "defense_quality": nan if quality is None else quality,
                      "defense_steps": nan if steps is None else steps,
                      "attack_name": attack, "attack_eps": nan if eps is None else eps})


@pytest.mark.parametrize("name, eps, key", [("narcissus", 0.0313725, "narcissus-8"), ("narcissus", 16 / 255, "narcissus-16"),
                                            ("narcissus", 0.03, None), ("narcissus", None, None),
                                            ("gradient_matching", 16 / 255, "gradient_matching"), (None, None, None)])
def test_attack_key_needs_the_exact_published_eps(name, eps, key):
    assert attack_key(name, float("nan") if eps is None else eps) == key


def test_paper_cells_pick_the_published_row():
    ebm = paper_cells(cell("puregen_ebm", "narcissus", 0.0313725))
    assert [(c.poison, c.nat, c.source) for c in ebm] == [("1.39 ± 0.8 (max 2.50)", "92.92", "T1 ResNet-18"),
                                                          ("1.89", "91.94", "T2 HLB")]
    assert [c.poison for c in paper_cells(cell("jpeg", "narcissus", 0.0627451, 25))] == ["11.85 (max 36.90)"]
    assert paper_cells(cell("jpeg", "narcissus", 0.0627451, 75)) == []  # Table 4 gives JPEG-25 only
    assert [c.source for c in paper_cells(cell("jpeg", "narcissus", 0.0313725, 75))] == ["T1 ResNet-18", "T2 HLB"]
    assert [c.source for c in paper_cells(cell("puregen_filt", "narcissus", 0.0313725))] == ["T10 ResNet-18"]
    assert paper_cells(cell("puregen_ebm", "gradient_matching", 16 / 255))[0].poison == "1.00"
    assert paper_cells(cell("puregen_ebm", "badnets", 16 / 255)) == []
    assert paper_cells(cell("puregen_ebm", None)) == []  # a report without the params: nothing to match


def test_paper_cells_only_at_the_published_purification_length():
    ns16 = ("narcissus", 16 / 255)
    assert paper_cells(cell("puregen_ebm", *ns16, steps=150))[0].poison == "7.35 (max 16.94)"
    assert paper_cells(cell("puregen_ebm", *ns16, steps=300)) == []
    assert paper_cells(cell("puregen_ebm", *ns16, steps=0)) == []
    assert paper_cells(cell("puregen_ddpm", *ns16, steps=75))[0].poison == "5.21 (max 13.32)"
    assert paper_cells(cell("puregen_ddpm", *ns16, steps=125)) == []


def test_report_records_each_purifiers_own_length():
    """``defense_steps`` is an EBM cell's Langevin steps and a DDPM cell's t, never the Langevin default a DDPM
    run also records."""
    from tests.unit.sweep.test_report import _record, runs_frame
    runs = runs_frame([
        _record("ebm", "narcissus", "triggered", 0, 0, {"poison_success_m1": 0.1, "nat_acc": 0.6},
                **{"defense.name": "puregen_ebm", "defense.langevin.steps": "300", "defense.diffusion.steps": "75"}),
        _record("ddpm", "narcissus", "triggered", 0, 0, {"poison_success_m1": 0.1, "nat_acc": 0.6},
                **{"defense.name": "puregen_ddpm", "defense.langevin.steps": "150", "defense.diffusion.steps": "125"}),
        _record("jpeg", "narcissus", "triggered", 0, 0, {"poison_success_m1": 0.1, "nat_acc": 0.6},
                **{"defense.name": "jpeg", "defense.langevin.steps": "150"})])
    steps = build_table(runs).stats.set_index("row")["defense_steps"]
    assert steps["ebm"] == 300 and steps["ddpm"] == 125 and pd.isna(steps["jpeg"])


def test_report_csv_reads_back_to_the_same_cells(tmp_path):
    table = build_table(golden_runs())
    back = read_stats_csv(write_report(golden_runs(), tmp_path)["csv"])
    assert list(back.columns) == list(table.stats.columns)
    for (_, ours), (_, read) in zip(table.stats.iterrows(), back.iterrows(), strict=True):
        assert format_cell(read, 1) == format_cell(ours, 1) and format_cell(read, 3) == format_cell(ours, 3)


def test_comparison_has_one_line_per_attacked_cell(tmp_path):
    stats = read_stats_csv(write_report(golden_runs(), tmp_path)["csv"])
    lines = [line for line in paper_comparison(stats).splitlines() if line.startswith("| ")][1:]
    assert [tuple(line.split(" | ")[:2]) for line in lines] == [
        ("| badnets", "none"), ("| badnets", "puregen_ebm"), ("| bullseye", "none"), ("| bullseye", "puregen_ebm")]
    none_badnets = lines[0].split(" | ")
    assert none_badnets[2] == "70.0 ± 18.3 (max 85.0)" and none_badnets[3] == "90.0 ± 14.1 (max 100.0)"
    assert none_badnets[-1] == "— |"  # the paper has no BadNets column
    bullseye = lines[3].split(" | ")
    assert bullseye[2] == "20.0 [3.6, 62.4]" and bullseye[3] == "—"  # triggerless: no m = 3


def test_read_stats_csv_names_the_file(tmp_path):
    bad = tmp_path / "other.csv"
    pd.DataFrame({"row": ["none"], "value": [1]}).to_csv(bad, index=False)
    with pytest.raises(UserInputError, match="other.csv: not a report CSV"):
        read_stats_csv(bad)
