"""Every registered DataDefense keeps ids, labels, order, shape and dtype, and is seed-deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import make_imageset
from puregen_dist.config.generative import DiffusionConfig, LangevinConfig, PureGenConfig
from puregen_dist.defenses import build_defense
from puregen_dist.registry import registry_for

DEFENSES = registry_for("defense")


def defense_config(name: str, checkpoints: tuple):
    """Defaults, except PureGen defenses get tiny checkpoints and 3 steps per stage (at most 2 reps)."""
    cls = DEFENSES.get(name).config_cls
    if not issubclass(cls, PureGenConfig):
        return cls()
    ebm, ddpm = checkpoints
    defaults = cls(ebm=str(ebm), ddpm=str(ddpm))
    return dataclasses.replace(
        defaults, langevin=LangevinConfig(steps=3 if defaults.langevin.steps else 0),
        diffusion=DiffusionConfig(steps=3), reps=min(defaults.reps, 2), batch_size=5)


@pytest.mark.parametrize("name", DEFENSES.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_data_defense_contract(name, channels, tiny_checkpoints):
    data = make_imageset(n=12, size=16, channels=channels)
    defense = build_defense(defense_config(name, tiny_checkpoints[channels]))
    defense.validate(data)
    out = defense.apply(data, seed=0)
    assert out.images.dtype == np.uint8 and out.images.shape == data.images.shape
    assert np.array_equal(out.ids, data.ids) and np.array_equal(out.labels, data.labels)
    assert out.classes == data.classes
    assert np.array_equal(defense.apply(data, seed=0).images, out.images)


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if n.startswith("puregen_")])
def test_puregen_defenses_refuse_mismatched_data(name, tiny_checkpoints):
    defense = build_defense(defense_config(name, tiny_checkpoints[1]))
    with pytest.raises(ValueError, match="channel"):
        defense.validate(make_imageset(n=4, size=16, channels=3))


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if n.startswith("puregen_")])
def test_puregen_defenses_name_a_missing_checkpoint(name, tmp_path):
    cfg = DEFENSES.get(name).config_cls(ebm=str(tmp_path / "no_ebm"), ddpm=str(tmp_path / "no_ddpm"))
    with pytest.raises(ValueError, match="no_(ebm|ddpm)"):
        build_defense(cfg)
