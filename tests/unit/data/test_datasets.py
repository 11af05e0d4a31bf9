"""Dataset loaders: digits, CIFAR (torchvision format), Parquet, image folders, and their error messages."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from puregen_dist.config.schema import DataConfig
from puregen_dist.data.datasets import DatasetError, dataset_stats, load_data, resize_images

CIFAR10_PARQUET = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "cifar10-jpeg"


# --------------------------------------------------------------------------------------------- helpers


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W) or (H, W, 3) uint8 -> encoded image bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _solid(value: int, size: int = 6, channels: int = 3) -> np.ndarray:
    """A constant image whose pixel value identifies it."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.full(shape, value, dtype=np.uint8)


def _write_parquet(path: Path, blobs: list[bytes | None], labels: list[int], *, struct: bool = True,
                   names: list[str] | None = None, image_column: str = "img") -> None:
    """A Hugging Face style Parquet file; ``names`` become ClassLabel names in the schema metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if struct:
        paths = [f"{i}.png" for i in range(len(blobs))]
        fields = [pa.array(blobs, pa.binary()), pa.array(paths)]
        images = pa.StructArray.from_arrays(fields, ["bytes", "path"])
    else:
        images = pa.array(blobs, pa.binary())
    table = pa.table({image_column: images, "label": pa.array(labels, pa.int64())})
    if names is not None:
        features = {"img": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path)


def _parquet_dataset(root: Path, **kwargs) -> None:
    """train: 6 rows (labels 0,1,2,0,1,2), test: 3 rows; pixel value = 10 * label + row."""
    for split, n in (("train", 6), ("test", 3)):
        labels = [i % 3 for i in range(n)]
        blobs = [_encode(_solid(10 * lab + i)) for i, lab in enumerate(labels)]
        _write_parquet(root / f"{split}.parquet", blobs, labels, **kwargs)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tiny_imagenet(root: Path, annotations: str | None = None) -> None:
    """Two wnids (listed in non-sorted order), 2 train images each, 3 annotated val images, words.txt."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("n02\nn01\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\nn09\tother\n")
    for k, wnid in enumerate(("n02", "n01")):
        for i in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", _solid(40 + 100 * k, 8))
    for i, wnid in enumerate(("n01", "n02", "n01")):
        _save(root / "val" / "images" / f"val_{i}.JPEG", _solid(140 if wnid == "n01" else 40, 8))
    if annotations is None:
        annotations = "".join(f"val_{i}.JPEG\t{w}\t0\t0\t7\t7\n" for i, w in enumerate(("n01", "n02", "n01")))
    (root / "val" / "val_annotations.txt").write_text(annotations)


# --------------------------------------------------------------------------------------------- digits


def test_digits_default_is_16x16_gray() -> None:
    train, test = load_data(DataConfig())
    assert train.shape == test.shape == (16, 16, 1)
    assert train.images.dtype == np.uint8
    assert train.classes == tuple(str(d) for d in range(10))
    assert len(train) + len(test) == 1797
    assert not np.intersect1d(train.ids, test.ids).size
    assert set(np.unique(test.labels)) == set(range(10))


def test_digits_native_size_scales_to_255() -> None:
    from sklearn.datasets import load_digits

    train, test = load_data(DataConfig(image_size=8))
    assert train.shape == (8, 8, 1)
    raw = load_digits().images
    expected = np.round(raw[train.ids] * 255 / 16).astype(np.uint8)
    assert np.array_equal(train.images[..., 0], expected)
    assert train.images.max() == 255


def test_digits_resize_to_32_and_subsets() -> None:
    train, test = load_data(DataConfig(image_size=32, train_per_class=5, test_per_class=3))
    assert train.shape == test.shape == (32, 32, 1)
    assert np.bincount(train.labels).tolist() == [5] * 10
    assert np.bincount(test.labels).tolist() == [3] * 10


def test_digits_split_follows_test_fraction_and_seed() -> None:
    train, test = load_data(DataConfig(test_fraction=0.5))
    assert abs(len(test) - 1797 / 2) <= 10
    _, other = load_data(DataConfig(test_fraction=0.5, subset_seed=1))
    assert not np.array_equal(test.ids, other.ids)


def test_resize_keeps_constants_and_rounds() -> None:
    images = np.full((3, 5, 7, 3), 200, dtype=np.uint8)
    out = resize_images(images, 11)
    assert out.shape == (3, 11, 11, 3) and out.dtype == np.uint8
    assert (out == 200).all()
    assert resize_images(out, 11) is out


# ------------------------------------------------------------------------------------- CIFAR (torchvision)


def _fake_cifar10(root: Path) -> None:
    """torchvision's pickled CIFAR-10 layout with 4 train images per batch and 3 test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{b}", 4, 4 * (b - 1)) for b in range(1, 6)] + [("test_batch", 3, 0)]
    for name, count, offset in batches:
        labels = [(offset + i) % 10 for i in range(count)]
        data = np.stack([np.full(3 * 32 * 32, offset + i, dtype=np.uint8) for i in range(count)])
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"k{i}" for i in range(10)]}, f)


def test_cifar10_torchvision_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # fake files, no real md5s
    _fake_cifar10(tmp_path)
    train, test = load_data(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert train.shape == (32, 32, 3) and len(train) == 20 and len(test) == 3
    assert train.classes == tuple(f"k{i}" for i in range(10))
    assert np.array_equal(train.ids, np.arange(20))
    assert np.array_equal(train.labels, np.arange(20) % 10)
    assert np.array_equal(train.images[:, 0, 0, 0], np.arange(20))


def test_cifar_missing_folder_says_where_and_how(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="cifar10", root=str(root)))
    message = str(err.value)
    assert str(root) in message and "cifar-10-batches-py" in message and "data.download: true" in message


# --------------------------------------------------------------------------------------------- Parquet


def test_parquet_struct_column_with_hf_names(tmp_path: Path) -> None:
    _parquet_dataset(tmp_path / "ds", names=["a", "b", "c", "d"])
    train, test = load_data(DataConfig(dataset="parquet", root=str(tmp_path / "ds")))
    assert train.classes == ("a", "b", "c", "d")
    assert train.shape == (6, 6, 3) and len(train) == 6 and len(test) == 3
    assert np.array_equal(train.labels, [0, 1, 2, 0, 1, 2])
    assert np.array_equal(train.ids, np.arange(6)) and np.array_equal(test.ids, np.arange(3))
    assert np.array_equal(train.images[:, 0, 0, 0], [10 * (i % 3) + i for i in range(6)])


def test_parquet_binary_grayscale_shards(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    for split, shards in (("train", 2), ("test", 1)):
        for s in range(shards):
            blobs = [_encode(_solid(50 * s + i, channels=1)) for i in range(2)]
            _write_parquet(root / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet", blobs, [s, 1 - s],
                           struct=False, image_column="image")
    train, test = load_data(DataConfig(dataset="parquet", root=str(root), image_column="image", image_size=8))
    assert train.shape == (8, 8, 1) and len(train) == 4 and len(test) == 2
    assert train.classes == ("0", "1")
    assert np.array_equal(train.labels, [0, 1, 1, 0])
    assert np.array_equal(train.images[:, 3, 3, 0], [0, 1, 50, 51])


def test_parquet_missing_root_names_path(tmp_path: Path) -> None:
    root = tmp_path / "does-not-exist"
    with pytest.raises(DatasetError, match="does-not-exist") as err:
        load_data(DataConfig(dataset="parquet", root=str(root)))
    assert str(root) in str(err.value)


def test_parquet_missing_file_names_layout(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "train.parquet", [_encode(_solid(1))], [0])
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="parquet", root=str(tmp_path)))
    assert str(tmp_path / "test.parquet") in str(err.value) and "data/train-*.parquet" in str(err.value)


def test_parquet_missing_column_names_it(tmp_path: Path) -> None:
    _parquet_dataset(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="parquet", root=str(tmp_path), label_column="fine_label"))
    message = str(err.value)
    assert "'fine_label'" in message and "train.parquet" in message and "'img'" in message


@pytest.mark.parametrize(("rows", "bad"), [(5, 3), (5000, 4321)])  # 5000 rows: decoded in threaded chunks
def test_parquet_corrupt_image_names_row(tmp_path: Path, rows: int, bad: int) -> None:
    good = _encode(_solid(7))
    blobs = [good] * rows
    blobs[bad] = b"definitely not a png"
    _write_parquet(tmp_path / "train.parquet", blobs, [i % 2 for i in range(rows)])
    _write_parquet(tmp_path / "test.parquet", blobs[:1], [0])
    with pytest.raises(DatasetError, match=rf"train\.parquet row {bad}\b"):
        load_data(DataConfig(dataset="parquet", root=str(tmp_path)))


def test_a_parquet_subset_decodes_only_its_rows_and_equals_that_subset_of_the_whole(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from puregen_dist.data import datasets
    from puregen_dist.data.selection import stratified_subset

    blobs = [_encode(_solid(3 * i)) for i in range(40)]  # pixel value 3i identifies row i
    labels = [i % 4 for i in range(40)]
    _write_parquet(tmp_path / "train.parquet", blobs, labels)
    _write_parquet(tmp_path / "test.parquet", blobs[:8], labels[:8])
    whole, _ = load_data(DataConfig(dataset="parquet", root=str(tmp_path)))
    decoded: list[str] = []
    real = datasets._decode_one
    monkeypatch.setattr(datasets, "_decode_one",
                        lambda source, index, where: decoded.append(where(index)) or real(source, index, where))
    train, test = load_data(DataConfig(dataset="parquet", root=str(tmp_path), train_per_class=2, test_per_class=1))
    assert len(train) == 8 and len(test) == 4 and len(decoded) == 12  # not 48
    expected = stratified_subset(whole, 2, 0)
    assert np.array_equal(train.ids, expected.ids) and np.array_equal(train.images, expected.images)
    assert np.array_equal(train.images[:, 0, 0, 0], 3 * train.ids)
    assert sorted(decoded[:8]) == sorted(f"{tmp_path / 'train.parquet'} row {i}" for i in train.ids)


def test_parquet_differing_sizes_names_row(tmp_path: Path) -> None:
    blobs = [_encode(_solid(1, size=6)), _encode(_solid(2, size=6)), _encode(_solid(3, size=7))]
    _write_parquet(tmp_path / "train.parquet", blobs, [0, 1, 0])
    _write_parquet(tmp_path / "test.parquet", blobs[:1], [0])
    with pytest.raises(DatasetError, match=r"row 2\b.*7x7"):
        load_data(DataConfig(dataset="parquet", root=str(tmp_path)))


def test_cifar10_parquet_full() -> None:
    if not CIFAR10_PARQUET.is_dir():
        pytest.skip(f"../shared/datasets/cifar10-jpeg not present: {CIFAR10_PARQUET} "
                    "(a fresh clone has no ../shared)")
    cfg = DataConfig(dataset="parquet", root=str(CIFAR10_PARQUET))
    train, test = load_data(cfg)
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.shape == test.shape == (32, 32, 3) and train.images.dtype == np.uint8
    assert train.classes[:3] == ("airplane", "automobile", "bird") and train.num_classes == 10
    # rows are sorted by class, so the labels are known exactly
    assert np.array_equal(train.labels, np.repeat(np.arange(10), 5000))
    assert np.array_equal(test.labels, np.repeat(np.arange(10), 1000))
    assert np.array_equal(train.ids, np.arange(50_000)) and np.array_equal(test.ids, np.arange(10_000))
    assert 80 < train.images.mean() < 160
    assert dataset_stats(cfg, 3)[0] == (0.4914, 0.4822, 0.4465)


# --------------------------------------------------------------------------------------------- image folders


def test_cinic_layout(tmp_path: Path) -> None:
    for split, per_class in (("train", 3), ("test", 2)):
        for k, name in enumerate(("dog", "cat", "bird")):  # sorted: bird=0, cat=1, dog=2
            for i in range(per_class):
                suffix = ".png" if i % 2 == 0 else ".jpeg"
                _save(tmp_path / split / name / f"{name}_{i}{suffix}", _solid(80 * k, 8))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    train, test = load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="cinic10"))
    assert train.classes == ("bird", "cat", "dog")
    assert len(train) == 9 and len(test) == 6 and train.shape == (8, 8, 3)
    assert np.array_equal(train.labels, np.repeat([0, 1, 2], 3))
    value_of = {0: 160, 1: 80, 2: 0}  # bird was written with k=2, cat with k=1, dog with k=0
    for data in (train, test):
        expected = np.array([value_of[int(lab)] for lab in data.labels])
        assert np.abs(data.images[:, 4, 4, 0].astype(int) - expected).max() <= 3
    # CINIC-10-ImageNet: skip the CIFAR-derived files by name
    _save(tmp_path / "train" / "cat" / "cifar10-train-7.png", _solid(80, 8))
    only_imagenet, _ = load_data(DataConfig(dataset="image_folder", root=str(tmp_path), exclude="cifar10"))
    assert len(only_imagenet) == 9
    assert len(load_data(DataConfig(dataset="image_folder", root=str(tmp_path)))[0]) == 10


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    _tiny_imagenet(tmp_path)
    train, test = load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="tiny_imagenet"))
    assert train.classes == ("tabby", "goldfish")  # wnids.txt order, words.txt names
    assert np.array_equal(train.labels, [0, 0, 1, 1])
    assert np.array_equal(test.labels, [1, 0, 1])
    assert np.abs(test.images[:, 4, 4, 0].astype(int) - np.array([140, 40, 140])).max() <= 3
    assert np.array_equal(test.ids, np.arange(3))


def test_tiny_imagenet_unknown_wnid_names_line(tmp_path: Path) -> None:
    _tiny_imagenet(tmp_path, annotations="val_0.JPEG\tn01\t0\t0\t7\t7\nval_1.JPEG\tn77\t0\t0\t7\t7\n")
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="tiny_imagenet"))
    message = str(err.value)
    assert "val_annotations.txt line 2" in message and "n77" in message


def test_tiny_imagenet_malformed_line(tmp_path: Path) -> None:
    _tiny_imagenet(tmp_path, annotations="val_0.JPEG\tn01\t0\t0\t7\t7\nval_1.JPEG n02 0 0 7 7\n")
    with pytest.raises(DatasetError, match="val_annotations.txt line 2: malformed"):
        load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="tiny_imagenet"))


def test_tiny_imagenet_missing_annotations_and_unreadable_image(tmp_path: Path) -> None:
    _tiny_imagenet(tmp_path)
    (tmp_path / "val" / "images" / "val_1.JPEG").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match="val_1.JPEG"):
        load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="tiny_imagenet"))
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="val_annotations.txt not found"):
        load_data(DataConfig(dataset="image_folder", root=str(tmp_path), layout="tiny_imagenet"))


def test_image_folder_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "cinic"
    with pytest.raises(DatasetError) as err:
        load_data(DataConfig(dataset="image_folder", root=str(root)))
    assert str(root) in str(err.value)


# --------------------------------------------------------------------------------------------- stats


def test_dataset_stats() -> None:
    assert dataset_stats(DataConfig(dataset="cifar100", root="x"), 3)[1] == (0.2673, 0.2564, 0.2762)
    tiny = DataConfig(dataset="image_folder", root="x", layout="tiny_imagenet")
    assert dataset_stats(tiny, 3)[0] == (0.4802, 0.4481, 0.3975)
    assert dataset_stats(DataConfig(dataset="image_folder", root="x"), 3)[0] == (0.4789, 0.4723, 0.4305)
    assert dataset_stats(DataConfig(), 1) == ((0.5,), (0.5,))
    assert dataset_stats(DataConfig(dataset="parquet", root="/data/cifar100-jpeg"), 3)[0][0] == 0.5071
    assert dataset_stats(DataConfig(dataset="parquet", root="/data/mine"), 3) == ((0.5,) * 3, (0.5,) * 3)
