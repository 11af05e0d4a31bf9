from __future__ import annotations

import numpy as np

from conftest import make_imageset
from puregen_dist.defenses.jpeg import JPEGConfig, JPEGDefense, jpeg_roundtrip


def test_jpeg_preserves_ids_labels_and_shape_for_rgb_and_gray():
    for channels in (1, 3):
        data = make_imageset(n=10, size=16, channels=channels)
        out = JPEGDefense(JPEGConfig(quality=50)).apply(data, seed=0)
        assert out.images.shape == data.images.shape and out.images.dtype == np.uint8
        assert np.array_equal(out.ids, data.ids) and np.array_equal(out.labels, data.labels)
        assert not np.array_equal(out.images, data.images)


def test_higher_quality_is_closer_to_the_input():
    data = make_imageset(n=8, size=32, channels=3)
    err = {q: np.abs(jpeg_roundtrip(data.images, q).astype(int) - data.images).mean() for q in (25, 95)}
    assert err[95] < err[25]


def test_jpeg_is_deterministic():
    data = make_imageset(n=4, size=16)
    assert np.array_equal(jpeg_roundtrip(data.images, 75), jpeg_roundtrip(data.images, 75))
