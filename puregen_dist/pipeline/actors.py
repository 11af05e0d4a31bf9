"""Ray Data UDFs of the purification pipeline: a stateful purifier actor, an energy actor for
PureGen-Filt, and a stateless task for CPU-only data defenses (JPEG, ...).

Batches follow the Parquet image-set schema of :mod:`puregen_dist.data.io`: ``image`` (B rows of H*W*C
uint8, row-major HWC), ``id`` (B,) int64, ``label`` (B,) int64, ``poisoned`` (B,) bool. A UDF accepts the
batch as a ``pyarrow.Table`` (``batch_format="pyarrow"``, what the pipeline uses: the ``fixed_size_list``
type survives to the written files) or as ``dict[str, np.ndarray]`` (``batch_format="numpy"``: Ray hands a
``fixed_size_list`` column over as a (B,) object array of (H*W*C,) uint8 arrays; a tensor column arrives as
a (B, ...) uint8 array). The image column is returned in the representation it came in; every other column
is passed through.

Each image's result depends only on (image, id, seed) (per-sample noise streams), so the output does not
depend on the actor count, the batch size or the block layout.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.identity import with_device
from puregen_dist.data.transforms import sym_to_uint8, to_sym
from puregen_dist.defenses import build_defense
from puregen_dist.pipeline.models import resolve_models
from puregen_dist.plugins import load_plugins
from puregen_dist.protocols import GenerativeDefense
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

Batch = pa.Table | dict[str, np.ndarray]
"""A Ray Data batch in ``pyarrow`` or ``numpy`` format."""
Shape = tuple[int, int, int]
"""(H, W, C) of one image."""


# ------------------------------------------------------------------------------------------ batch columns


def get_column(batch: Batch, name: str) -> Any:
    """Column ``name`` of ``batch``: ``pa.ChunkedArray`` (pyarrow batch) or ``np.ndarray`` (numpy batch)."""
    return batch.column(name) if isinstance(batch, pa.Table) else batch[name]


def with_column(batch: Batch, name: str, column: Any) -> Batch:
    """``batch`` with column ``name`` replaced by ``column`` (a new batch; the input is not modified)."""
    if isinstance(batch, pa.Table):
        return batch.set_column(batch.schema.get_field_index(name), batch.schema.field(name), column)
    return {**batch, name: column}


def ids_of(batch: Batch) -> np.ndarray:
    """(B,) int64 ids of ``batch``."""
    column = get_column(batch, "id")
    values = column.to_numpy() if isinstance(column, pa.ChunkedArray) else np.asarray(column)
    return values.astype(np.int64, copy=False)


def images_of(column: Any, shape: Shape) -> np.ndarray:
    """(B, H, W, C) uint8, writeable, from an image column in any representation Ray hands over.

    Accepts a ``pa.ChunkedArray`` / ``pa.FixedSizeListArray`` / ``pa.ListArray`` of uint8, a (B,) object array
    of per-row arrays, or a numeric array (B, ...) whose rows hold H*W*C values.
    """
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        flat = _arrow_values(column)
    elif isinstance(column, np.ndarray) and column.dtype == object:
        flat = np.concatenate([np.asarray(row).reshape(-1) for row in column]) if len(column) else np.empty(0)
    else:
        flat = np.asarray(column).reshape(-1)
    count = len(column)
    if flat.size != count * math.prod(shape):
        raise UserInputError(f"image column holds {flat.size} values for {count} rows, expected "
                             f"{math.prod(shape)} per row (shape {shape})")
    images = flat.astype(np.uint8, copy=False).reshape(count, *shape)
    return images if images.flags.writeable and images.flags.c_contiguous else np.array(images)


def _arrow_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The flattened child values of an Arrow list column, respecting slices (nulls are refused)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise UserInputError(f"image column has {array.null_count} null row(s)")
    return array.flatten().to_numpy(zero_copy_only=False)


def column_like(original: Any, images: np.ndarray) -> Any:
    """``images`` (B, H, W, C) uint8 in the representation of the image column ``original``."""
    if isinstance(original, (pa.ChunkedArray, pa.Array)):
        values = pa.array(images.reshape(-1), type=pa.uint8())
        if pa.types.is_fixed_size_list(original.type):
            return pa.FixedSizeListArray.from_arrays(values, type=original.type)
        offsets = pa.array(np.arange(len(images) + 1, dtype=np.int64) * math.prod(images.shape[1:]))
        return pa.LargeListArray.from_arrays(offsets, values).cast(original.type)
    if isinstance(original, np.ndarray) and original.dtype == object:
        out = np.empty(len(images), dtype=object)
        for i, image in enumerate(images):
            out[i] = image.reshape(np.shape(original[i]))
        return out
    return images.reshape(np.shape(original))


# ------------------------------------------------------------------------------------------ devices


def ray_device() -> str:
    """"cuda" when Ray assigned this worker a GPU, else "cpu" (never ``torch.cuda.is_available()``: Ray leaves
    GPUs visible to zero-GPU workers). Outside Ray (a direct call, a unit test): "cpu"."""
    import ray

    if not ray.is_initialized():  # ray.get_gpu_ids() would start a local instance
        return "cpu"
    return "cuda" if len(ray.get_gpu_ids()) > 0 else "cpu"


# ------------------------------------------------------------------------------------------ UDFs


class PurifierActor:
    """Stateful Ray Data UDF: builds a generative defense once per actor, then purifies batches.

    Args:
        defense_cfg: the config of a defense declared ``pipeline = "actor_pool"`` (its builder returns a
            :class:`~puregen_dist.protocols.GenerativeDefense`); its ``device`` is replaced by the one Ray
            assigned.
        seed: experiment seed (per-sample noise streams are seeded by (seed, id)).
        shape: (H, W, C) of one image.
        select_ids: when given, only rows with these ids are purified, the others pass through unchanged
            (the second pass of PureGen-Filt).
        store_uri: the artifact store that model keys in ``defense_cfg`` refer to (resolved here, on the
            actor's node).
    """

    def __init__(self, defense_cfg: Any, seed: int, shape: Shape,
                 select_ids: np.ndarray | None = None, store_uri: str | None = None) -> None:
        load_plugins()
        if defense_cfg.pipeline != "actor_pool":
            raise UserInputError(f"defense {defense_cfg.name!r} runs as pipeline {defense_cfg.pipeline!r}, "
                                 "not on a generative actor pool")
        defense_cfg = resolve_models(defense_cfg, store_uri)
        self.defense: GenerativeDefense = build_defense(with_device(defense_cfg, ray_device()))
        self.device = torch.device(self.defense.device)
        self.seed = int(seed)
        self.shape = tuple(shape)
        self.select = None if select_ids is None else np.unique(np.asarray(select_ids, dtype=np.int64))
        log.info("purifier actor ready on %s", self.device)

    def __call__(self, batch: Batch) -> Batch:
        """Purify ``batch``'s images (B rows) and return the batch with the new ``image`` column."""
        column = get_column(batch, "image")
        images = images_of(column, self.shape)
        return with_column(batch, "image", column_like(column, self.purify(images, ids_of(batch))))

    def purify(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 + (B,) ids -> (B, H, W, C) uint8 (rows outside ``select_ids`` unchanged)."""
        rows = np.arange(len(ids)) if self.select is None else np.flatnonzero(np.isin(ids, self.select))
        if len(rows) == 0:
            return images
        x = to_sym(images[rows]).to(self.device)
        y = self.defense.purifier.purify(x, torch.from_numpy(np.ascontiguousarray(ids[rows])), seed=self.seed)
        if len(rows) == len(ids):
            return sym_to_uint8(y)
        out = images.copy()
        out[rows] = sym_to_uint8(y)
        return out


class EnergyActor:
    """Stateful Ray Data UDF for PureGen-Filt's ranking pass: EBM energies of the unpurified images.

    Returns ``{"id": (B,) int64, "energy": (B,) float32}``; only the EBM is loaded.
    """

    def __init__(self, defense_cfg: Any, shape: Shape, store_uri: str | None = None) -> None:
        from puregen_dist.generative.purifiers import EBMPurifier, load_ebm

        load_plugins()
        defense_cfg = resolve_models(defense_cfg, store_uri)
        device = ray_device()
        energy, _ = load_ebm(defense_cfg.ebm, device)
        self.ebm = EBMPurifier(energy, defense_cfg.langevin)
        self.shape = tuple(shape)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        images = images_of(get_column(batch, "image"), self.shape)
        energies = self.ebm.energies(to_sym(images)).numpy().astype(np.float32, copy=False)
        return {"id": ids_of(batch), "energy": energies}


def data_defense_task(batch: Batch, *, defense_cfg: Any, seed: int, shape: Shape,
                      classes: Sequence[str]) -> Batch:
    """Stateless Ray Data UDF (task pool) applying a CPU data defense's ``apply`` to one batch.

    ``classes`` are the image set's class names (labels index into them; labels are kept as they are). Only
    defenses whose per-image result does not depend on the batch give output independent of the batching.
    """
    column = get_column(batch, "image")
    labels = get_column(batch, "label")
    labels = labels.to_numpy() if isinstance(labels, pa.ChunkedArray) else np.asarray(labels)
    labels = labels.astype(np.int64, copy=False)
    data = ImageSet(images_of(column, shape), labels, ids_of(batch), tuple(classes))
    out = _cached_defense(defense_cfg).apply(data, seed=seed)
    return with_column(batch, "image", column_like(column, out.images))


def _cached_defense(cfg: Any) -> Any:
    """The defense of ``cfg``, built once per worker process when ``cfg`` is hashable (plugins are loaded
    before a build, not on every batch)."""
    try:
        hash(cfg)
    except TypeError:
        return _build(cfg)
    return _build_cached(cfg)


@functools.lru_cache(maxsize=4)
def _build_cached(cfg: Any) -> Any:
    return _build(cfg)


def _build(cfg: Any) -> Any:
    load_plugins()  # a Ray worker is an entry point: register built-ins and $PUREGEN_DIST_PLUGINS
    return build_defense(cfg)
