"""Every registered DataDefense keeps ids, labels, order, shape and dtype."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_imageset
from puregen_dist.defenses import build_defense
from puregen_dist.registry import registry_for

DEFENSES = registry_for("defense")


@pytest.mark.parametrize("name", DEFENSES.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_data_defense_contract(name, channels):
    data = make_imageset(n=16, size=16, channels=channels)
    defense = build_defense(DEFENSES.get(name).config_cls())
    if not hasattr(defense, "apply"):
        pytest.skip(f"{name} is a training defense")
    out = defense.apply(data, seed=0)
    assert out.images.dtype == np.uint8 and out.images.shape == data.images.shape
    assert np.array_equal(out.ids, data.ids) and np.array_equal(out.labels, data.labels)
    assert out.classes == data.classes
