"""Every recipe in sweeps/ loads into a valid config (litgpt's config-hub test); sweep files expand into
validated cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from puregen_dist.cli import CONFIG_KINDS, guess_command
from puregen_dist.config.loading import load_config, load_yaml
from puregen_dist.sweep.spec import load_sweep

SWEEP_FILES = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.name for p in SWEEP_FILES])
def test_recipe_loads(path):
    kind = guess_command(load_yaml(path))
    if kind == "sweep":
        sweep = load_sweep(path)
        assert sweep.name and sweep.cells
        assert len({c.cell_id for c in sweep.cells}) == len(sweep.cells)
    else:
        assert load_config(CONFIG_KINDS[kind], path).name


def test_there_are_recipes():
    names = {p.name for p in SWEEP_FILES}
    assert {"quickstart_run.yaml", "quickstart.yaml"} <= names


def test_quickstart_cells():
    sweep = load_sweep(Path(__file__).resolve().parents[2] / "sweeps" / "quickstart.yaml")
    rows = sorted({c.row for c in sweep.cells})
    assert rows == ["jpeg", "none", "puregen_ddpm", "puregen_ebm"] and len(sweep.cells) == 16
    assert {c.config.seed for c in sweep.cells} == {0, 1} and {c.col for c in sweep.cells} == {"badnets", "narcissus"}
    keys = sweep.model_keys()
    narcissus = [c for c in sweep.cells if c.col == "narcissus"]
    assert all(c.config.attack.surrogate == keys["surrogate"] for c in narcissus)  # one surrogate for all
    ebm_cells = [c for c in sweep.cells if c.row == "puregen_ebm"]
    assert all(c.config.defense.ebm == keys["ebm"] for c in ebm_cells)  # `model:ebm` -> the artifact key
