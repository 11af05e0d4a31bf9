"""uint8 NHWC <-> float NCHW conversions: ranges, round trip, and read-only inputs (Ray's zero-copy objects)."""

from __future__ import annotations

import warnings

import numpy as np

from puregen_dist.data.transforms import sym_to_uint8, to_sym, to_unit, unit_to_uint8


def test_ranges_and_exact_round_trip():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4, 3), dtype=np.uint8)
    unit, sym = to_unit(images), to_sym(images)
    assert unit.shape == (3, 3, 5, 4) and 0.0 <= unit.min() and unit.max() <= 1.0
    assert -1.0 <= sym.min() and sym.max() <= 1.0
    assert np.array_equal(unit_to_uint8(unit), images) and np.array_equal(sym_to_uint8(sym), images)


def test_read_only_input_converts_without_a_warning_and_stays_untouched():
    images = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    images.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unit = to_unit(images)
    unit.zero_()
    assert images.min() == 255
