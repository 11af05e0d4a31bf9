"""Every recipe in sweeps/ loads into a valid config (litgpt's config-hub test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from puregen_dist.cli import CONFIG_KINDS, guess_command
from puregen_dist.config.loading import load_config, load_yaml

SWEEP_FILES = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.name for p in SWEEP_FILES])
def test_recipe_loads(path):
    cfg = load_config(CONFIG_KINDS[guess_command(load_yaml(path))], path)
    assert cfg.name


def test_there_are_recipes():
    assert any(p.name == "quickstart_run.yaml" for p in SWEEP_FILES)
