from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_imageset
from puregen_dist.config.errors import UserInputError
from puregen_dist.data.io import read_imageset, write_imageset


def test_roundtrip_keeps_images_labels_ids_classes_and_poison_flags(tmp_path):
    data = make_imageset(n=20, size=8, channels=3, classes=4)
    path = write_imageset(data, tmp_path / "set.parquet", poisoned_ids=data.ids[[1, 5]])
    back, poisoned = read_imageset(path)
    assert np.array_equal(back.images, data.images) and np.array_equal(back.labels, data.labels)
    assert np.array_equal(back.ids, data.ids) and back.classes == data.classes
    assert poisoned.tolist() == [i in (1, 5) for i in range(20)]
    assert [p.name for p in tmp_path.iterdir()] == ["set.parquet"]


def test_wrong_schema_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), path)
    with pytest.raises(UserInputError, match="other.parquet.*missing columns"):
        read_imageset(path)
