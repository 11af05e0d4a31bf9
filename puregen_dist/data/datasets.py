"""Dataset loaders: every source becomes a (train, test) pair of uint8 :class:`ImageSet` s.

Sources (``DataConfig.dataset``): scikit-learn's bundled digits (the default, no download), torchvision
CIFAR-10/100 (``root``, optional ``download``), Hugging Face style Parquet (encoded image bytes + integer
label) and image folders (CINIC-10 or Tiny-ImageNet layout). Train ids are 0..N-1 and test ids 0..M-1 in
source order (two separate id spaces), except for digits, whose test split is held out of one id space.
:func:`load_data` then applies the config's seeded split and subsets and the optional resize. Bad input raises
:class:`DatasetError` saying where it looked and what it expected; nothing is downloaded implicitly.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.schema import DataConfig
from puregen_dist.data.selection import stratified_partition, stratified_split, stratified_subset
from puregen_dist.types import ImageSet

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""CIFAR-10 class names in the standard label order."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
"""File suffixes read from image folders (compared lower-case)."""

_DEFAULT_SIZE: dict[str, int] = {"digits": 16}
"""Square size used when ``DataConfig.image_size`` is None (datasets not listed keep their native size)."""

_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "cinic10": ((0.4789, 0.4723, 0.4305), (0.2421, 0.2383, 0.2587)),
}

_GRAY_MODES = frozenset({"1", "L", "LA"})
_WIDE_MODES = {"I": "32-bit integer pixels", "F": "32-bit float pixels", "I;16": "16-bit pixels",
               "I;16B": "16-bit pixels", "I;16L": "16-bit pixels", "I;16N": "16-bit pixels"}
"""PIL modes whose pixels are not 8-bit: refused rather than silently clipped to 0..255."""
_DECODE_WORKERS = 2
_DECODE_CHUNK = 2048
_RESIZE_CHUNK = 2048

Source = bytes | str | None
"""One encoded image: its bytes (Parquet), a file path (image folders), or None (a null Parquet cell)."""


class DatasetError(UserInputError):
    """A dataset that is missing, laid out unexpectedly, or holds unreadable data."""


# --------------------------------------------------------------------------------------------- common helpers


def _image_set(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ImageSet:
    """ImageSet of (N, H, W, C) uint8 ``images`` and (N,) ``labels``, ids 0..N-1 in source order."""
    ids = np.arange(len(images), dtype=np.int64)
    return ImageSet(images, np.asarray(labels, dtype=np.int64), ids, tuple(str(c) for c in classes))


def _root(cfg: DataConfig, expected: str) -> Path:
    """``cfg.root`` as a Path that must be an existing directory; ``expected`` describes the layout."""
    root = Path(str(cfg.root)).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset {cfg.dataset!r}: data.root {root} does not exist or is not a directory "
                           f"(expected {expected})")
    return root


def _named_like(root: str | None) -> str | None:
    """"cifar100" or "cifar10" when the root folder's name says so (e.g. ``cifar10-jpeg``), else None."""
    name = Path(str(root or "")).name.lower().replace("-", "").replace("_", "")
    return next((key for key in ("cifar100", "cifar10") if key in name), None)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize to ``size`` x ``size``: (N, H, W, C) uint8 -> (N, size, size, C) uint8.

    Interpolates in float (torch ``interpolate``), then rounds and clamps back to uint8; returns the input
    unchanged when it already has that size.
    """
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for start in range(0, n, _RESIZE_CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + _RESIZE_CHUNK])).permute(0, 3, 1, 2)
        y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + _RESIZE_CHUNK] = y.permute(0, 2, 3, 1).numpy()
    return out


def _resized(data: ImageSet, size: int) -> ImageSet:
    """``data`` with every image resized to ``size`` x ``size`` (ids, labels, classes unchanged)."""
    return data.replace(images=resize_images(data.images, size))


def _to_rgb(data: ImageSet) -> ImageSet:
    """``data`` with 1-channel images repeated to 3 channels (3-channel data unchanged)."""
    if data.shape[2] != 1:
        return data
    return data.replace(images=np.repeat(data.images, 3, axis=3))


# --------------------------------------------------------------------------------------------- image decoding


def _decode_one(source: Source, index: int, where: Callable[[int], str]) -> np.ndarray:
    """Decode one image to (H, W) uint8 (grayscale) or (H, W, 3) uint8 (anything else, converted to RGB)."""
    if source is None:
        raise DatasetError(f"{where(index)}: the image is missing (null)")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.mode.startswith("I") or im.mode == "F":  # I, I;16*: 16/32-bit integers; F: floats
                raise DatasetError(f"{where(index)}: a {im.mode!r} image ({_WIDE_MODES.get(im.mode, 'not 8-bit')}); "
                                   "expected 8-bit images (modes L, RGB, RGBA, P: uint8 pixels)")
            target = "L" if im.mode in _GRAY_MODES else "RGB"
            return np.asarray(im if im.mode == target else im.convert(target))
    except DatasetError:
        raise
    except UnidentifiedImageError as exc:
        raise DatasetError(f"{where(index)}: cannot decode the image (unrecognised image format)") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{where(index)}: cannot decode the image ({type(exc).__name__}: {exc})") from exc


def _decode_range(sources: Sequence[Source], lo: int, hi: int, out: np.ndarray, gray: np.ndarray,
                  where: Callable[[int], str]) -> None:
    """Decode ``sources[lo:hi]`` into ``out[lo:hi]`` ((N, H, W, 3) uint8); flag grayscale rows in ``gray``."""
    size = out.shape[1:3]
    for i in range(lo, hi):
        arr = _decode_one(sources[i], i, where)
        if arr.shape[:2] != size:
            raise DatasetError(f"{where(i)}: image is {arr.shape[0]}x{arr.shape[1]} but the first image is "
                               f"{size[0]}x{size[1]}; all images of a split must share one size")
        gray[i] = arr.ndim == 2
        out[i] = arr[..., None] if arr.ndim == 2 else arr


def _decode_images(sources: Sequence[Source], where: Callable[[int], str]) -> np.ndarray:
    """Decode N >= 1 encoded images into a preallocated (N, H, W, C) uint8 array.

    C is 1 when every image is grayscale, else 3 (grayscale images are repeated to RGB). All images must share
    the first one's size. ``where(i)`` names row i in error messages (a file and row, or a file path).
    """
    first = _decode_one(sources[0], 0, where)
    n = len(sources)
    out = np.empty((n, *first.shape[:2], 3), dtype=np.uint8)
    gray = np.zeros(n, dtype=bool)
    gray[0] = first.ndim == 2
    out[0] = first[..., None] if gray[0] else first
    bounds = [(max(lo, 1), min(lo + _DECODE_CHUNK, n)) for lo in range(0, n, _DECODE_CHUNK)]  # row 0: done
    if len(bounds) == 1:
        _decode_range(sources, *bounds[0], out, gray, where)
    else:
        with ThreadPoolExecutor(_DECODE_WORKERS) as pool:
            futures = [pool.submit(_decode_range, sources, lo, hi, out, gray, where) for lo, hi in bounds]
            try:
                for future in futures:  # in order, so the first failing row is the one reported
                    future.result()
            except DatasetError:
                for future in futures:
                    future.cancel()
                raise
    return out[..., :1].copy() if gray.all() else out


@dataclass(frozen=True)
class EncodedSplit:
    """A split read as encoded images (Parquet cells or image files), decoded only once its rows are chosen.

    Selection (partitions, per-class subsets, the digits split) looks at labels and ids only, so a 1,000-image
    subset of CIFAR-10 decodes its own 1,000 JPEGs, not all 60,000. Row i is ``sources[i]``, with id i.
    """

    sources: Sequence[Source]
    labels: np.ndarray
    classes: tuple[str, ...]
    where: Callable[[int], str]
    """Names row i (file and row, or file path) in error messages."""

    def rows(self) -> ImageSet:
        """Every row as an ImageSet with (N, 0, 0, 0) placeholder images: ids 0..N-1, labels, classes."""
        n = len(self.sources)
        return ImageSet(np.empty((n, 0, 0, 0), np.uint8), np.asarray(self.labels, np.int64),
                        np.arange(n, dtype=np.int64), self.classes)

    def decode(self, rows: ImageSet) -> ImageSet:
        """``rows`` (a selection of :meth:`rows`) with their images decoded, (K, H, W, C) uint8 (C: 1 when
        every decoded image is grayscale, else 3); errors name the source row."""
        ids = rows.ids
        logger.info("decoding %d of %d images", len(ids), len(self.sources))
        images = _decode_images([self.sources[i] for i in ids], lambda k: self.where(int(ids[k])))
        return rows.replace(images=images)


Split = ImageSet | EncodedSplit
"""What a loader returns per split: decoded images (small embedded sets), or encoded ones."""


def _rows(split: Split) -> ImageSet:
    return split.rows() if isinstance(split, EncodedSplit) else split


def _materialize(source: Split, rows: ImageSet) -> ImageSet:
    """The selected ``rows`` of ``source`` with their pixels."""
    return source.decode(rows) if isinstance(source, EncodedSplit) else rows


# --------------------------------------------------------------------------------------------- digits


def _load_digits(cfg: DataConfig) -> tuple[ImageSet, None]:
    """scikit-learn's 1797 8x8 digits as (1797, 8, 8, 1) uint8 (0..16 scaled to 0..255); no test split."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn; imported here to keep imports light

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return _image_set(images, digits.target, [str(d) for d in range(10)]), None


# ------------------------------------------------------------------------------------- CIFAR (torchvision)

_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _cifar_split(cfg: DataConfig, root: Path, train: bool) -> ImageSet:
    """One torchvision CIFAR split: (N, 32, 32, 3) uint8 from ``.data`` and ``.targets``."""
    from torchvision import datasets  # imported here: only the CIFAR loaders need torchvision

    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    folder = root / _CIFAR_FOLDERS[cfg.dataset]
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as exc:
        raise DatasetError(f"{cfg.dataset}: {folder} is incomplete or corrupted ({exc}); delete it and set "
                           f"data.download: true to fetch it again") from exc
    except OSError as exc:
        raise DatasetError(f"{cfg.dataset}: downloading into {root} failed ({exc}); put the torchvision "
                           f"{folder.name!r} folder there by hand") from exc
    return _image_set(np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets), ds.classes)


def _load_cifar(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """torchvision CIFAR-10 or CIFAR-100 from ``<root>/cifar-10-batches-py`` (or ``cifar-100-python``)."""
    root = Path(str(cfg.root)).expanduser()
    folder = root / _CIFAR_FOLDERS[cfg.dataset]
    if not cfg.download and not folder.is_dir():
        raise DatasetError(f"{cfg.dataset}: {folder} not found: expected torchvision's {folder.name!r} "
                           f"folder in data.root {root}; set data.download: true to fetch it (nothing is "
                           f"downloaded implicitly)")
    return _cifar_split(cfg, root, train=True), _cifar_split(cfg, root, train=False)


# --------------------------------------------------------------------------------------------- Parquet

_PARQUET_LAYOUT = "<root>/train.parquet and <root>/test.parquet, or <root>/data/train-*.parquet shards"


def _parquet_files(root: Path, split: str) -> list[Path]:
    """Files of ``split``: ``<root>/<split>.parquet``, else the ``<root>/data/<split>-*.parquet`` shards."""
    single = root / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards = sorted((root / "data").glob(f"{split}-*.parquet"))
    if not shards:
        raise DatasetError(f"parquet: no {split} split: {single} not found (expected {_PARQUET_LAYOUT})")
    return shards


def _image_blobs(column: pa.ChunkedArray, path: Path, name: str) -> list[bytes | None]:
    """The encoded bytes of an image column: a struct with a ``bytes`` field, or plain binary."""
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DatasetError(f"{path}: image column {name!r} is {column.type}, a struct without 'bytes'")
        column = pc.struct_field(column, "bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DatasetError(f"{path}: image column {name!r} is {column.type}; expected struct<bytes>/binary")
    return column.to_pylist()


def _label_array(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """(N,) int64 labels of an integer label column without nulls or negative values."""
    if not pa.types.is_integer(column.type):
        raise DatasetError(f"{path}: label column {name!r} is {column.type}; expected integers")
    if column.null_count:
        raise DatasetError(f"{path}: label column {name!r} has {column.null_count} null values")
    labels = column.to_numpy().astype(np.int64)
    if len(labels) and labels.min() < 0:
        row = int(np.argmin(labels))
        raise DatasetError(f"{path}: label column {name!r} has negative values (row {row})")
    return labels


def _read_parquet_file(path: Path, cfg: DataConfig) -> tuple[list[bytes | None], np.ndarray]:
    """Encoded images (N blobs) and labels (N,) int64 of one Parquet file (reads only the two columns)."""
    try:
        present = pq.read_schema(path).names
        missing = [c for c in (cfg.image_column, cfg.label_column) if c not in present]
        if missing:
            raise DatasetError(f"{path}: no column {missing[0]!r} (data.image_column={cfg.image_column!r}, "
                               f"data.label_column={cfg.label_column!r}); columns present: {present}")
        table = pq.read_table(path, columns=[cfg.image_column, cfg.label_column])
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
    if table.num_rows == 0:
        raise DatasetError(f"{path}: the file has no rows")
    blobs = _image_blobs(table.column(cfg.image_column), path, cfg.image_column)
    labels = _label_array(table.column(cfg.label_column), path, cfg.label_column)
    return blobs, labels


def _read_parquet_split(root: Path, split: str, cfg: DataConfig
                        ) -> tuple[list[bytes | None], np.ndarray, Callable[[int], str]]:
    """Encoded images (N blobs) and labels (N,) int64 of a split, shards concatenated in name order, and
    ``where(i)``: the file and row of row ``i`` (for error messages)."""
    files = _parquet_files(root, split)
    parts = [_read_parquet_file(path, cfg) for path in files]
    starts = np.cumsum([0, *(len(p[1]) for p in parts)])

    def where(i: int) -> str:
        shard = int(np.searchsorted(starts, i, side="right")) - 1
        return f"{files[shard]} row {i - int(starts[shard])}"

    return [blob for p in parts for blob in p[0]], np.concatenate([p[1] for p in parts]), where


def _hf_class_names(path: Path, label_column: str) -> list[str] | None:
    """ClassLabel names of ``label_column`` from a file's Hugging Face schema metadata, if it carries them."""
    metadata = pq.read_schema(path).metadata or {}
    try:
        info = json.loads(metadata.get(b"huggingface", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return None
    features = (info.get("info") or {}).get("features") or info.get("features") or {}
    feature = features.get(label_column) if isinstance(features, dict) else None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _first_row(bad: np.ndarray) -> int:
    """The first row flagged in ``bad`` (a boolean mask over the rows)."""
    return int(np.flatnonzero(bad)[0])


def _parquet_classes(root: Path, cfg: DataConfig, train: tuple[np.ndarray, Callable[[int], str]],
                     test: tuple[np.ndarray, Callable[[int], str]]) -> list[str]:
    """The class names of a Parquet dataset, checking its labels against them.

    Hugging Face ClassLabel names declare the classes (every label, train or test, must be one of them); without
    them the classes are those of the train split, which must be 0..K-1 with every class present (a gap means a
    stray label: 100000 among 0..9 would make 100,001 classes), and the test split may only use those. Named
    CIFAR-10's for a 10-class root named like cifar10, else "0".."K-1". Errors name the file and row.
    """
    (train_labels, train_where), (test_labels, test_where) = train, test
    names = _hf_class_names(_parquet_files(root, "train")[0], cfg.label_column)
    if names is not None:
        for labels, where in ((train_labels, train_where), (test_labels, test_where)):
            bad = labels >= len(names)
            if bad.any():
                row = _first_row(bad)
                raise DatasetError(f"{where(row)}: label {labels[row]} is not one of the {len(names)} classes the "
                                   f"Hugging Face metadata of {root} declares (0..{len(names) - 1})")
        return names
    present = np.unique(train_labels)
    gaps = np.flatnonzero(present != np.arange(len(present)))
    if len(gaps):
        missing, label = int(gaps[0]), int(present[gaps[0]])
        row = _first_row(train_labels == label)
        raise DatasetError(f"{train_where(row)}: label {label}, but no training image has label {missing}: without "
                           f"Hugging Face ClassLabel metadata the labels must be 0..K-1 with every class in the train "
                           f"split (this split has {len(present)} distinct labels)")
    num_classes = len(present)
    bad = test_labels >= num_classes
    if bad.any():
        row = _first_row(bad)
        raise DatasetError(f"{test_where(row)}: label {test_labels[row]} is not a class of the train split (labels "
                           f"0..{num_classes - 1})")
    if num_classes == len(CIFAR10_CLASSES) and _named_like(cfg.root) == "cifar10":
        return list(CIFAR10_CLASSES)
    return [str(k) for k in range(num_classes)]


def _load_parquet(cfg: DataConfig) -> tuple[EncodedSplit, EncodedSplit]:
    """Hugging Face style Parquet: encoded images in ``cfg.image_column``, labels in ``cfg.label_column``."""
    root = _root(cfg, _PARQUET_LAYOUT)
    train_blobs, train_labels, train_where = _read_parquet_split(root, "train", cfg)
    test_blobs, test_labels, test_where = _read_parquet_split(root, "test", cfg)
    classes = tuple(_parquet_classes(root, cfg, (train_labels, train_where), (test_labels, test_where)))
    return (EncodedSplit(train_blobs, train_labels, classes, train_where),
            EncodedSplit(test_blobs, test_labels, classes, test_where))


# --------------------------------------------------------------------------------------------- image folders

_CINIC_LAYOUT = "<root>/train/<class>/*.png and <root>/test/<class>/*.png (CINIC-10)"
_TINY_LAYOUT = ("<root>/wnids.txt, <root>/train/<wnid>/images/*.JPEG, <root>/val/images/*.JPEG and "
                "<root>/val/val_annotations.txt (Tiny-ImageNet)")


def _subfolders(folder: Path, expected: str) -> list[str]:
    """Sorted names of the subfolders of ``folder``, which must exist and have at least one."""
    if not folder.is_dir():
        raise DatasetError(f"image_folder: {folder} not found (expected {expected})")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise DatasetError(f"image_folder: {folder} has no class folders (expected {expected})")
    return names


def _image_files(folder: Path, exclude: str | None = None) -> list[Path]:
    """Image files (png/jpg/jpeg, any case) directly in ``folder``, sorted by name, skipping names that
    contain ``exclude``."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not (exclude and exclude in p.name))


def _read_files(files: list[Path], labels: list[int], classes: Sequence[str], folder: Path) -> EncodedSplit:
    """Image ``files`` with ``labels`` (ids 0..N-1 in list order), decoded once selected."""
    if not files:
        raise DatasetError(f"image_folder: no images (png/jpg/jpeg) found under {folder}")
    return EncodedSplit([str(f) for f in files], np.asarray(labels, dtype=np.int64), tuple(str(c) for c in classes),
                        lambda i: str(files[i]))


def _class_tree(folder: Path, classes: list[str], exclude: str | None = None, *, every_class: bool = False
                ) -> EncodedSplit:
    """``<folder>/<class>/*`` images labelled by the class folder's position in ``classes`` (file names
    containing ``exclude`` are skipped); with ``every_class`` (the train split) a class without images is an
    error."""
    files: list[Path] = []
    labels: list[int] = []
    index = {name: k for k, name in enumerate(classes)}
    for name in _subfolders(folder, _CINIC_LAYOUT):
        if name not in index:
            raise DatasetError(f"image_folder: {folder / name} is a class the train split lacks ({classes})")
        found = _image_files(folder / name, exclude)
        if every_class and not found:
            skipped = f" whose name does not contain {exclude!r} (data.exclude)" if exclude else ""
            raise DatasetError(f"image_folder: {folder / name} holds no images (png/jpg/jpeg){skipped}: an empty "
                               "class")
        files += found
        labels += [index[name]] * len(found)
    return _read_files(files, labels, classes, folder)


def _load_cinic(cfg: DataConfig) -> tuple[Split, Split]:
    """CINIC-10 layout: class names are the sorted folder names of ``<root>/train``."""
    root = _root(cfg, _CINIC_LAYOUT)
    classes = _subfolders(root / "train", _CINIC_LAYOUT)
    return (_class_tree(root / "train", classes, cfg.exclude, every_class=True),
            _class_tree(root / "test", classes, cfg.exclude))


def _tiny_wnids(root: Path) -> list[str]:
    """Tiny-ImageNet class order: ``wnids.txt`` lines, else the sorted folder names of ``<root>/train``."""
    path = root / "wnids.txt"
    if not path.is_file():
        return _subfolders(root / "train", _TINY_LAYOUT)
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DatasetError(f"image_folder: {path} lists no wnids")
    return wnids


def _tiny_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable class names from ``<root>/words.txt`` (first synonym; the wnid where missing or ambiguous)."""
    path = root / "words.txt"
    if not path.is_file():
        return list(wnids)
    words = dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)
    names = [words.get(w, w).split(",")[0].strip() or w for w in wnids]
    return [n if names.count(n) == 1 else f"{n} ({w})" for n, w in zip(names, wnids, strict=True)]


def _tiny_train(root: Path, wnids: list[str], classes: list[str]) -> EncodedSplit:
    """``<root>/train/<wnid>/images/*`` labelled by the wnid's position in ``wnids``."""
    files: list[Path] = []
    labels: list[int] = []
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(f"image_folder: {folder} not found (expected {_TINY_LAYOUT})")
        found = _image_files(folder)
        files += found
        labels += [k] * len(found)
    return _read_files(files, labels, classes, root / "train")


def _parse_annotation(line: str, number: int, path: Path, index: dict[str, int]) -> tuple[str, int]:
    """(file name, label) of a ``val_annotations.txt`` line: name, wnid, [4 box ints], tab-separated."""
    fields = line.split("\t")
    box = fields[2:]
    box_ok = not box or (len(box) == 4 and all(f.strip().lstrip("-").isdigit() for f in box))
    if len(fields) < 2 or not box_ok or not fields[0].strip():
        raise DatasetError(f"{path} line {number}: malformed annotation {line!r} (expected file name, wnid "
                           f"and 4 box integers, tab-separated)")
    wnid = fields[1].strip()
    if wnid not in index:
        raise DatasetError(f"{path} line {number}: wnid {wnid!r} is not one of the {len(index)} classes")
    return fields[0].strip(), index[wnid]


def _tiny_val(root: Path, wnids: list[str], classes: list[str]) -> EncodedSplit:
    """``<root>/val/images/*`` labelled by ``<root>/val/val_annotations.txt``, in annotation order."""
    path = root / "val" / "val_annotations.txt"
    if not path.is_file():
        raise DatasetError(f"image_folder: {path} not found (expected {_TINY_LAYOUT})")
    index = {wnid: k for k, wnid in enumerate(wnids)}
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    pairs = [_parse_annotation(line, n, path, index) for n, line in lines]
    files = [root / "val" / "images" / name for name, _ in pairs]
    return _read_files(files, [label for _, label in pairs], classes, root / "val" / "images")


def _load_tiny_imagenet(cfg: DataConfig) -> tuple[Split, Split]:
    """Tiny-ImageNet layout: train from ``train/<wnid>/images``, test from ``val/`` and its annotations."""
    root = _root(cfg, _TINY_LAYOUT)
    wnids = _tiny_wnids(root)
    classes = _tiny_names(root, wnids)
    return _tiny_train(root, wnids, classes), _tiny_val(root, wnids, classes)


_FOLDER_LAYOUTS: dict[str, Callable[[DataConfig], tuple[Split, Split]]] = {
    "cinic10": _load_cinic,
    "tiny_imagenet": _load_tiny_imagenet,
}


def _load_image_folder(cfg: DataConfig) -> tuple[Split, Split]:
    """An image folder in the layout ``cfg.layout`` names."""
    if cfg.layout not in _FOLDER_LAYOUTS:
        raise DatasetError(f"data.layout {cfg.layout!r} is not one of {sorted(_FOLDER_LAYOUTS)}")
    return _FOLDER_LAYOUTS[cfg.layout](cfg)


# --------------------------------------------------------------------------------------------- public API

_LOADERS: dict[str, Callable[[DataConfig], tuple[Split, Split | None]]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "parquet": _load_parquet,
    "image_folder": _load_image_folder,
}
"""Loader per ``DataConfig.dataset``: (train, test), test None when the source has no test split."""


def load_data(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """Load ``cfg.dataset`` as (train, test) ImageSets of (N, H, W, C) uint8 images.

    Sources without a test split (digits) are split per class with ``cfg.test_fraction`` and
    ``cfg.subset_seed``; then train and test are subset to ``cfg.train_per_class`` / ``cfg.test_per_class``
    (seeds ``subset_seed`` and ``subset_seed + 1``), and resized to ``cfg.image_size`` (digits default to 16).
    Selection never looks at pixels: encoded sources (Parquet, image folders) decode only the selected rows,
    and resizing after the subsets gives the same result as before them, at a fraction of the cost.
    """
    if cfg.dataset not in _LOADERS:
        raise DatasetError(f"data.dataset {cfg.dataset!r} is not one of {sorted(_LOADERS)}")
    train_source, test_source = _LOADERS[cfg.dataset](cfg)
    train = _rows(train_source)
    if test_source is None:
        train, test = stratified_split(train, cfg.test_fraction, cfg.subset_seed)
        test_source = train_source
    else:
        test = _rows(test_source)
    if cfg.train_partitions > 1:
        whole = train
        train = stratified_partition(train, cfg.train_partitions, cfg.train_partition, cfg.subset_seed + 2)
        _check_partition(cfg, whole, train)
    if cfg.train_per_class is not None:
        train = stratified_subset(train, cfg.train_per_class, cfg.subset_seed)
    if cfg.test_per_class is not None:
        test = stratified_subset(test, cfg.test_per_class, cfg.subset_seed + 1)
    train, test = _materialize(train_source, train), _materialize(test_source, test)
    size = cfg.image_size if cfg.image_size is not None else _DEFAULT_SIZE.get(cfg.dataset)
    if size is not None:
        _check_resize_fits(train, test, size)
        train, test = _resized(train, size), _resized(test, size)
    if train.shape[2] != test.shape[2]:
        train, test = _to_rgb(train), _to_rgb(test)
    logger.info("loaded %s: %d train + %d test images of shape %s, %d classes",
                cfg.dataset, len(train), len(test), train.shape, train.num_classes)
    return train, test


def _check_partition(cfg: DataConfig, whole: ImageSet, part: ImageSet) -> None:
    """Every class of the training split keeps at least one image in the selected partition."""
    emptied = np.setdiff1d(np.unique(whole.labels), np.unique(part.labels))
    if len(emptied):
        k = int(emptied[0])
        smallest = int(np.bincount(whole.labels)[np.unique(whole.labels)].min())
        raise DatasetError(f"data.train_partition: part {cfg.train_partition} of {cfg.train_partitions} holds no "
                           f"training image of class {k} ({whole.classes[k]!r}); the smallest class has {smallest} "
                           f"images, so use at most {smallest} data.train_partitions")


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _check_resize_fits(train: ImageSet, test: ImageSet, size: int) -> None:
    """Resizing both splits to ``size`` x ``size`` must fit in this machine's memory (refused before allocating)."""
    need = (len(train) + len(test)) * size * size * train.shape[2]
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise DatasetError(f"data.image_size: {size}x{size} images of {len(train) + len(test)} rows need "
                           f"{need / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory")


def dataset_stats(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation (mean, std) in [0, 1] units for the configured dataset.

    CIFAR-10 / CIFAR-100 (torchvision, or Parquet whose root is named like ``cifar10-jpeg``), Tiny-ImageNet
    and CINIC-10 folder layouts have their standard 3-channel statistics; anything else (and any dataset seen
    with a channel count other than 3) gets 0.5 / 0.5 per channel.
    """
    key = {"image_folder": cfg.layout, "parquet": _named_like(cfg.root)}.get(cfg.dataset, cfg.dataset)
    if channels == 3 and key in _STATS:
        return _STATS[key]
    return (0.5,) * channels, (0.5,) * channels
