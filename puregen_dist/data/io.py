"""ImageSets at rest as Parquet: one uint8 tensor column plus ``id``, ``label`` and ``poisoned``.

Schema: ``image`` fixed_size_list<uint8>[H*W*C] (row-major HWC), ``id`` int64, ``label`` int64, ``poisoned``
bool; the image shape and class names live in the schema metadata under :data:`META_KEY`. Files are written
atomically (:func:`puregen_dist.atomic.atomic_file`), so a crash never leaves a half-written file under the
final name.

:func:`read_imageset` is the one reader of this format, for every caller (a file written here, a directory of
files written by Ray Data, the files of a stored artifact), on any ``pyarrow.fs`` filesystem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puregen_dist.atomic import atomic_file
from puregen_dist.config.errors import UserInputError
from puregen_dist.types import ImageSet

META_KEY = b"puregen_dist"
COLUMNS = ("image", "id", "label", "poisoned")
SCALAR_TYPES = {"id": pa.int64(), "label": pa.int64(), "poisoned": pa.bool_()}
EXPECTED = ("expected image fixed_size_list<uint8>[H*W*C], id int64, label int64, poisoned bool and the "
            "puregen_dist shape/classes metadata (files written by write_imageset)")
HIDDEN_PREFIXES = (".", "_")
"""Files (or directories) whose name starts with these are skipped, as by Ray Data and ``pyarrow.dataset``."""

Shape = tuple[int, int, int]
Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# ----------------------------------------------------------------------------------------------- writing


def imageset_table(data: ImageSet, poisoned_ids: np.ndarray | None = None) -> pa.Table:
    """The Arrow table of ``data`` (see the module docstring)."""
    n = len(data)
    flat = pa.array(data.images.reshape(n, -1).ravel(), type=pa.uint8())
    images = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(data.shape)))
    poisoned = np.isin(data.ids, poisoned_ids) if poisoned_ids is not None else np.zeros(n, bool)
    meta = json.dumps({"shape": list(data.shape), "classes": list(data.classes)}).encode()
    return pa.table({"image": images, "id": data.ids, "label": data.labels, "poisoned": poisoned},
                    metadata={META_KEY: meta})


def write_imageset(data: ImageSet, path: str | Path, poisoned_ids: np.ndarray | None = None) -> Path:
    """Atomically write ``data`` to ``path`` as Parquet (zstd)."""
    with atomic_file(path, "wb") as handle:
        pq.write_table(imageset_table(data, poisoned_ids), handle, compression="zstd")
    return Path(path)


# ----------------------------------------------------------------------------------------------- reading


def read_imageset(source: Source, *, filesystem: pafs.FileSystem | None = None, shape: Shape | None = None,
                  classes: Sequence[str] | None = None) -> tuple[ImageSet, np.ndarray]:
    """(ImageSet sorted by id, poisoned flags (N,) bool) of a Parquet image set (``pyarrow.dataset``).

    Args:
        source: a Parquet file, a directory (every ``*.parquet`` below it; names starting with ``.`` or ``_``
            skipped at any level), or a list of files. Paths are local or ``pyarrow.fs`` URIs (``s3://...``),
            or paths inside ``filesystem`` when it is given.
        filesystem: the filesystem holding ``source`` (default: from the URI, else the local disk).
        shape: (H, W, C) overriding the files' metadata (only needed for files without it).
        classes: class names overriding the files' metadata (ditto).

    Returns:
        The rows of every file, sorted by id, and their ``poisoned`` flags in the same order.

    Raises:
        UserInputError: naming the file or ``source``: nothing found, an unreadable file, missing columns,
            wrong column types, missing metadata, files that disagree on shape or classes, duplicate ids.
    """
    fs, files = locate(source, filesystem)
    label = _describe(source)
    fragments, shape, classes = _inspect(fs, files, shape, classes)
    dataset = ds.FileSystemDataset(fragments, schema=_columns(fragments[0].physical_schema),
                                   format=ds.ParquetFileFormat(), filesystem=fs)
    ids = _sorted_ids(dataset, label)
    return _gather(dataset, ids, shape, tuple(classes), label)


def resolve_path(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path (made absolute) or a ``pyarrow.fs`` URI; an unusable URI is
    a UserInputError naming it."""
    path = os.fspath(path)
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{path}: unreachable or unsupported storage URI ({exc})") from None


def locate(source: Source, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, Parquet files) of ``source`` (see :func:`read_imageset`); none found, or files on two
    filesystems, is an error."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        raise UserInputError("no Parquet files given")
    files: list[str] = []
    fs = filesystem
    for item in items:
        item_fs, path = resolve_path(item) if filesystem is None else (filesystem, os.fspath(item))
        if fs is not None and not item_fs.equals(fs):
            raise UserInputError(f"{os.fspath(item)}: on another filesystem than {os.fspath(items[0])}")
        fs = item_fs
        files += parquet_files(fs, path)
    if not files or fs is None:
        raise UserInputError(f"{_describe(source)}: no Parquet files found")
    return fs, files


def parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """``path`` itself if it is a file, else every ``*.parquet`` below it (hidden names skipped), sorted."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type != pafs.FileType.Directory:
            raise UserInputError(f"{path}: Parquet image set not found")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UserInputError(f"{path}: cannot list ({exc})") from None
    root = path.rstrip("/") + "/"
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                  and not _hidden(f.path[len(root):]))


def check_schema(file: str, schema: pa.Schema, shape: Shape | None = None,
                 classes: Sequence[str] | None = None) -> tuple[Shape, tuple[str, ...]]:
    """(shape, classes) of a file whose ``schema`` is an image set's (``shape`` / ``classes`` override the
    metadata); otherwise a UserInputError naming ``file``."""
    missing = [c for c in COLUMNS if c not in schema.names]
    raw = (schema.metadata or {}).get(META_KEY)
    if missing or (raw is None and (shape is None or classes is None)):
        raise UserInputError(f"{file}: not a puregen-dist image set (missing columns {missing} or metadata; "
                             f"pass shape and classes to read files without it); {EXPECTED}")
    info = _metadata(file, raw)
    shape = tuple(int(v) for v in (shape or info["shape"]))  # type: ignore[assignment]
    classes = tuple(str(c) for c in (classes or info["classes"]))
    wrong = [f"{name} is {schema.field(name).type}" for name, t in SCALAR_TYPES.items()
             if schema.field(name).type != t]
    image = schema.field("image").type
    if not (pa.types.is_fixed_size_list(image) and image.value_type == pa.uint8()
            and len(shape) == 3 and image.list_size == math.prod(shape)):
        wrong.insert(0, f"image is {image} for shape {list(shape)}")
    if wrong:
        raise UserInputError(f"{file}: wrong schema ({'; '.join(wrong)}); {EXPECTED}")
    return shape, classes  # type: ignore[return-value]


def _metadata(file: str, raw: bytes | None) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
        return {"shape": list(info["shape"]), "classes": list(info["classes"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{file}: unreadable puregen_dist metadata ({exc}); {EXPECTED}") from None


def _hidden(relative: str) -> bool:
    return any(part.startswith(HIDDEN_PREFIXES) for part in relative.split("/"))


def _describe(source: Source) -> str:
    """``source`` for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    items = [os.fspath(item) for item in source]
    return items[0] if len(items) == 1 else f"{items[0]} (and {len(items) - 1} more)"


def _inspect(fs: pafs.FileSystem, files: Sequence[str], shape: Shape | None, classes: Sequence[str] | None
             ) -> tuple[list[ds.ParquetFileFragment], Shape, tuple[str, ...]]:
    """A fragment per file after checking its schema (footer only); every file must agree with the first."""
    fmt, fragments, first = ds.ParquetFileFormat(), [], None
    for file in files:
        try:
            fragment = fmt.make_fragment(file, filesystem=fs)
            schema = fragment.physical_schema
        except (pa.ArrowException, OSError) as exc:
            raise UserInputError(f"{file}: not a readable Parquet file ({exc})") from None
        found = check_schema(file, schema, shape, classes)
        if first is not None and found != first:
            raise UserInputError(f"{file}: image shape {found[0]} / classes {list(found[1])} differ from "
                                 f"{files[0]} ({first[0]} / {list(first[1])})")
        first = found
        fragments.append(fragment)
    assert first is not None
    return fragments, first[0], first[1]


def _columns(schema: pa.Schema) -> pa.Schema:
    """The image-set columns of ``schema``, without metadata (read per file by :func:`check_schema`)."""
    return pa.schema([schema.field(c) for c in COLUMNS])


def _sorted_ids(dataset: ds.Dataset, label: str) -> np.ndarray:
    """Every id, sorted (a scan of the id column only); duplicates are an error."""
    try:
        ids = np.sort(dataset.to_table(columns=["id"]).column("id").to_numpy())
    except (pa.ArrowException, OSError) as exc:
        raise UserInputError(f"{label}: not a readable Parquet file ({exc})") from None
    dup = np.unique(ids[1:][ids[1:] == ids[:-1]])
    if len(dup):
        raise UserInputError(f"{label}: {len(dup)} duplicate id(s), e.g. {dup[:5].tolist()}")
    return ids.astype(np.int64, copy=False)


def _gather(dataset: ds.Dataset, ids: np.ndarray, shape: Shape, classes: tuple[str, ...],
            label: str) -> tuple[ImageSet, np.ndarray]:
    """Scatter each scanned batch into id-sorted arrays (batches may come in any order), so peak memory is
    the result plus one batch."""
    n = len(ids)
    images = np.empty((n, *shape), np.uint8)
    labels, poisoned, seen = np.empty(n, np.int64), np.empty(n, bool), 0
    try:
        for batch in dataset.to_batches(columns=list(COLUMNS)):
            rows = _positions(ids, batch.column("id").to_numpy(), label)
            images[rows] = _batch_images(batch.column("image"), shape, label)
            labels[rows] = batch.column("label").to_numpy(zero_copy_only=False)
            poisoned[rows] = batch.column("poisoned").to_numpy(zero_copy_only=False)
            seen += len(rows)
    except (pa.ArrowException, OSError) as exc:
        raise UserInputError(f"{label}: not a readable Parquet file ({exc})") from None
    if seen != n:
        raise UserInputError(f"{label}: {seen} rows on the second scan, {n} on the first (files modified "
                             "while read)")
    try:
        return ImageSet(images, labels, ids, classes), poisoned
    except ValueError as exc:
        raise UserInputError(f"{label}: {exc}") from None


def _positions(ids: np.ndarray, batch_ids: np.ndarray, label: str) -> np.ndarray:
    rows = np.minimum(np.searchsorted(ids, batch_ids), max(len(ids) - 1, 0))
    if len(batch_ids) and not np.array_equal(ids[rows], batch_ids):
        raise UserInputError(f"{label}: ids changed between two scans (files modified while read)")
    return rows


def _batch_images(column: pa.FixedSizeListArray, shape: Shape, label: str) -> np.ndarray:
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.size != len(column) * math.prod(shape):
        raise UserInputError(f"{label}: null images in the image column")
    return values.reshape(len(column), *shape)


def imageset_fingerprint(data: ImageSet) -> str:
    """SHA-256 (16 hex digits) of an image set's ids, labels, shape and pixels in id order: what identifies the
    data a model was trained on (recorded with shipped reference models)."""
    order = np.argsort(data.ids, kind="stable")
    digest = hashlib.sha256()
    digest.update(json.dumps({"shape": list(data.images.shape), "classes": list(data.classes)}).encode())
    for array in (data.ids[order], data.labels[order], data.images[order]):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
