from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import make_imageset
from puregen_dist.config.errors import UserInputError
from puregen_dist.data.io import META_KEY, imageset_table, read_imageset, write_imageset


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


# ---------------------------------------------------------------------------- the one reader (read_imageset)


def _assert_same(back, poisoned, data, poisoned_ids=()):
    order = np.argsort(data.ids)
    assert np.array_equal(back.ids, data.ids[order]) and np.array_equal(back.images, data.images[order])
    assert np.array_equal(back.labels, data.labels[order]) and back.classes == data.classes
    assert poisoned.tolist() == np.isin(data.ids[order], poisoned_ids).tolist()


def test_a_single_file_with_shuffled_ids_comes_back_sorted_and_writable(tmp_path):
    data = make_imageset(n=12, size=4).take(np.random.default_rng(0).permutation(12))
    back, poisoned = read_imageset(write_imageset(data, tmp_path / "s.parquet", poisoned_ids=data.ids[:3]))
    _assert_same(back, poisoned, data, data.ids[:3])
    assert back.images.flags.writeable and back.images.flags.c_contiguous and poisoned.dtype == bool


def test_a_directory_of_files_with_shuffled_ids_is_read_sorted_skipping_hidden_and_other_files(tmp_path):
    data = make_imageset(n=30, size=4, channels=1, classes=3)
    parts = np.array_split(np.random.default_rng(1).permutation(30), 3)
    sets, flagged = tmp_path / "sets", data.ids[[4, 7]]
    for i, rows in enumerate(parts):
        write_imageset(data.take(rows), sets / f"part-{2 - i}.parquet", poisoned_ids=flagged)
    write_imageset(make_imageset(n=2, size=4), sets / ".inprogress.parquet")  # hidden: skipped
    write_imageset(make_imageset(n=2, size=4), sets / "_tmp" / "x.parquet")  # in a hidden dir: skipped
    (sets / "manifest.json").write_text("{}")  # not Parquet: skipped
    for source in (sets, str(sets), f"file://{sets}", sorted(sets.glob("part-*.parquet"))):
        back, poisoned = read_imageset(source)
        _assert_same(back, poisoned, data, flagged)


def test_files_on_a_given_pyarrow_filesystem(tmp_path):
    data = make_imageset(n=6, size=4)
    write_imageset(data, tmp_path / "root" / "d" / "a.parquet")
    fs = pafs.SubTreeFileSystem(str(tmp_path / "root"), pafs.LocalFileSystem())
    _assert_same(*read_imageset("d", filesystem=fs), data)
    _assert_same(*read_imageset(["d/a.parquet"], filesystem=fs), data)


def test_missing_sources_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(UserInputError, match="nope.parquet: Parquet image set not found"):
        read_imageset(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty: no Parquet files found"):
        read_imageset(tmp_path / "empty")
    write_imageset(make_imageset(n=4, size=4), tmp_path / "d" / "good.parquet")
    (tmp_path / "d" / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match="junk.parquet: not a readable Parquet file"):
        read_imageset(tmp_path / "d")
    with pytest.raises(UserInputError, match="nosuchscheme://x: unreachable or unsupported storage URI"):
        read_imageset("nosuchscheme://x")


def test_wrong_types_and_missing_metadata_are_refused_naming_the_file(tmp_path):
    table = imageset_table(make_imageset(n=4, size=4))
    typed = table.set_column(1, "id", table.column("id").cast(pa.string()))
    pq.write_table(typed, tmp_path / "typed.parquet")
    with pytest.raises(UserInputError, match=r"typed\.parquet: wrong schema \(id is string"):
        read_imageset(tmp_path / "typed.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")
    with pytest.raises(UserInputError, match=r"bare\.parquet: not a puregen-dist image set.*metadata"):
        read_imageset(tmp_path / "bare.parquet")
    back, _ = read_imageset(tmp_path / "bare.parquet", shape=(4, 4, 3), classes=("a", "b", "c", "d"))
    assert back.shape == (4, 4, 3) and back.classes == ("a", "b", "c", "d")
    with pytest.raises(UserInputError, match=r"bare\.parquet: wrong schema \(image is .* shape \[4, 4, 1\]"):
        read_imageset(tmp_path / "bare.parquet", shape=(4, 4, 1), classes=("a", "b", "c", "d"))


def test_duplicate_ids_and_disagreeing_files_are_refused(tmp_path):
    data = make_imageset(n=6, size=4)
    write_imageset(data.take(np.arange(4)), tmp_path / "dup" / "a.parquet")
    write_imageset(data.take(np.arange(2, 6)), tmp_path / "dup" / "b.parquet")
    with pytest.raises(UserInputError, match=r"dup: 2 duplicate id\(s\), e.g. \[102, 103\]"):
        read_imageset(tmp_path / "dup")
    write_imageset(data.take(np.arange(3)), tmp_path / "mixed" / "a.parquet")
    write_imageset(make_imageset(n=3, size=4, classes=2), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(UserInputError, match=r"b\.parquet: image shape .* differ from .*a\.parquet"):
        read_imageset(tmp_path / "mixed")


def test_labels_outside_the_class_names_are_a_user_error(tmp_path):
    data = make_imageset(n=4, size=4, classes=4)
    table = imageset_table(data)
    meta = json.dumps({"shape": [4, 4, 3], "classes": ["a", "b"]}).encode()
    pq.write_table(table.replace_schema_metadata({META_KEY: meta}), tmp_path / "labels.parquet")
    with pytest.raises(UserInputError, match=r"labels\.parquet: ImageSet.labels must lie in \[0, 2\)"):
        read_imageset(tmp_path / "labels.parquet")


def test_write_is_atomic_and_leaves_no_temporary_file_on_error(tmp_path, monkeypatch):
    path = write_imageset(make_imageset(n=4, size=4), tmp_path / "set.parquet")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(pq, "write_table", explode)
    with pytest.raises(OSError, match="disk full"):
        write_imageset(make_imageset(n=8, size=4), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["set.parquet"]
