"""ImageSets at rest as Parquet: one uint8 tensor column plus ``id``, ``label`` and ``poisoned``.

Schema: ``image`` fixed_size_list<uint8>[H*W*C] (row-major HWC), ``id`` int64, ``label`` int64, ``poisoned``
bool; the image shape and class names live in the schema metadata. Files are written atomically (temporary name
in the same directory, then rename), so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from puregen_dist.config.errors import UserInputError
from puregen_dist.types import ImageSet

META_KEY = b"puregen_dist"
COLUMNS = ("image", "id", "label", "poisoned")


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(imageset_table(data, poisoned_ids), tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_imageset(path: str | Path) -> tuple[ImageSet, np.ndarray]:
    """(ImageSet, poisoned flags (N,) bool) from a file written by :func:`write_imageset`."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: Parquet image set not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    meta = (table.schema.metadata or {}).get(META_KEY)
    if missing or meta is None:
        raise UserInputError(f"{path}: not a puregen-dist image set (missing columns {missing} or metadata); "
                             f"expected columns {list(COLUMNS)}")
    info = json.loads(meta)
    shape = tuple(info["shape"])
    images = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, *shape)
    data = ImageSet(images=images.astype(np.uint8, copy=False),
                    labels=table.column("label").to_numpy().astype(np.int64),
                    ids=table.column("id").to_numpy().astype(np.int64), classes=tuple(info["classes"]))
    return data, table.column("poisoned").to_numpy(zero_copy_only=False).astype(bool)
