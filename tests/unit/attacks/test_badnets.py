from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_imageset
from puregen_dist.attacks.badnets import BadNetsAttack, BadNetsConfig
from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.config.errors import UserInputError


def craft(seed=0, data=None, **kw):
    data = data if data is not None else make_imageset(n=80, size=8, classes=4)
    return data, BadNetsAttack(BadNetsConfig(**kw)).craft(data, seed=seed)


def test_dirty_label_relabels_other_class_images_to_the_target():
    data, ps = craft(target_class=2, budget=0.25)
    assert len(ps.poison_ids) == 20 and ps.budget == pytest.approx(0.25)
    pos = data.positions(ps.poison_ids)
    assert np.all(data.labels[pos] != 2) and np.all(ps.poison_labels == 2)
    out = ps.materialize()
    assert np.array_equal(out.ids, data.ids) and np.all(out.labels[pos] == 2)
    untouched = np.setdiff1d(np.arange(len(data)), pos)
    assert np.array_equal(out.images[untouched], data.images[untouched])


def test_clean_label_keeps_labels_and_uses_target_class_only():
    data, ps = craft(target_class=1, budget=0.1, label_mode="clean")
    pos = data.positions(ps.poison_ids)
    assert np.all(data.labels[pos] == 1) and np.all(ps.poison_labels == 1)


def test_patch_overwrites_the_corner_only():
    data, ps = craft(patch_size=3, patch_location="bottom_right", pattern="white")
    pos = data.positions(ps.poison_ids)
    assert np.all(ps.poisoned[:, -3:, -3:, :] == 255)
    assert np.array_equal(ps.poisoned[:, :5, :, :], data.images[pos][:, :5, :, :])


def test_blend_respects_the_linf_bound():
    data, ps = craft(trigger="blend", eps=8 / 255, budget=0.5)
    pos = data.positions(ps.poison_ids)
    diff = np.abs(ps.poisoned.astype(int) - data.images[pos].astype(int))
    assert diff.max() <= 8 and diff.max() >= 7  # rounding to uint8 keeps the 8/255 bound
    assert ps.eps == pytest.approx(8 / 255)


def test_seeded_and_seed_sensitive():
    _, a = craft(seed=3)
    _, b = craft(seed=3)
    _, c = craft(seed=4)
    assert np.array_equal(a.poison_ids, b.poison_ids) and np.array_equal(a.poisoned, b.poisoned)
    assert not np.array_equal(a.poison_ids, c.poison_ids)


def test_trigger_magnification_scales_additive_triggers_only():
    attack = BadNetsAttack(BadNetsConfig(trigger="blend", eps=0.05))
    spec = attack.trigger_spec((4, 4, 1))
    x = torch.full((1, 1, 4, 4), 0.5)
    assert torch.allclose((apply_trigger(x, spec, 3.0) - x).abs(), torch.full_like(x, 0.15))
    patch = BadNetsAttack(BadNetsConfig(patch_size=2, pattern="white")).trigger_spec((4, 4, 1))
    assert torch.equal(apply_trigger(x, patch, 1.0), apply_trigger(x, patch, 3.0))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"target_class": 9}, "target_class"), ({"patch_size": 20}, "patch_size"),
     ({"label_mode": "clean", "budget": 0.9}, "budget")],
)
def test_data_dependent_errors(kw, needle):
    with pytest.raises(UserInputError, match=needle):
        craft(**kw)
