"""Every registered attack: shapes, dtype, ids, eps bound, budget, seed determinism."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_imageset
from puregen_dist.attacks import build_attack
from puregen_dist.registry import registry_for

ATTACKS = registry_for("attack")


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_contract(name):
    data = make_imageset(n=64, size=8, channels=3, classes=4)
    attack = build_attack(ATTACKS.get(name).config_cls())
    ps = attack.craft(data, seed=0)
    again = attack.craft(data, seed=0)
    assert ps.poisoned.dtype == np.uint8 and ps.poisoned.shape == (len(ps.poison_ids), *data.shape)
    assert set(ps.poison_ids.tolist()) <= set(data.ids.tolist())
    assert len(np.unique(ps.poison_ids)) == len(ps.poison_ids)
    assert np.array_equal(ps.poisoned, again.poisoned) and np.array_equal(ps.poison_ids, again.poison_ids)
    out = ps.materialize()
    assert np.array_equal(out.ids, data.ids) and out.images.shape == data.images.shape
    if ps.eps < 1.0 and len(ps.poison_ids):
        delta = np.abs(ps.poisoned.astype(int) - data.images[data.positions(ps.poison_ids)].astype(int))
        assert delta.max() <= round(ps.eps * 255)
