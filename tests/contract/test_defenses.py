"""Every registered DataDefense keeps ids, labels, order, shape and dtype (a filter: of the rows it keeps), and
is seed-deterministic; a training-time defense leaves the set unchanged before training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import make_imageset
from puregen_dist.config.generative import DiffusionConfig, LangevinConfig, PureGenConfig
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.defenses import build_defense
from puregen_dist.defenses.filtering import FilterConfig
from puregen_dist.protocols import TrainingDefense
from puregen_dist.registry import registry_for

DEFENSES = registry_for("defense")


def defense_config(name: str, checkpoints: tuple):
    """Defaults, except PureGen defenses get tiny checkpoints and 3 steps per stage (at most 2 reps), and filters
    a one-epoch small-CNN detector."""
    cls = DEFENSES.get(name).config_cls
    if issubclass(cls, FilterConfig):
        return cls(detector=ClassifierConfig(name="small_cnn", epochs=1, batch_size=4, milestones=(1,), threads=1))
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
    kept = np.flatnonzero(np.isin(data.ids, out.ids)) if defense.cfg.removes_rows else np.arange(len(data))
    assert out.images.dtype == np.uint8 and out.images.shape == (len(kept), *data.shape)
    assert np.array_equal(out.ids, data.ids[kept]) and np.array_equal(out.labels, data.labels[kept])
    assert out.classes == data.classes
    assert np.array_equal(defense.apply(data, seed=0).images, out.images)
    if isinstance(defense, TrainingDefense):  # acts during training only
        assert out is data and len(defense.hooks(seed=0)) >= 1


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
