"""Ray Data purification: Parquet image set in, purified Parquet image set out, streaming through a pool of
actors that each load the generative models once (or a task pool for CPU-only defenses such as JPEG).

    read_parquet -> repartition(target_num_rows_per_block=batch_size)   (streaming; every actor gets work)
                 -> map_batches(PurifierActor, ActorPoolStrategy(size=actors), num_cpus, num_gpus, batch_size)
                 -> write_parquet(output_dir, schema = the input's schema, metadata included)

PureGen-Filt needs a global ranking: a first pass (``EnergyActor``) streams (id, energy) pairs to the driver
(N numbers, never the images), the driver picks the top-k ids, and the second pass purifies only those rows.
Per-sample seeding makes the output independent of the actor count, the batch size and the block layout; it
equals the in-process ``DataDefense.apply`` byte for byte (rows in id order: see :func:`read_purified`).

Paths may be local or ``pyarrow.fs`` URIs (``s3://``, ``gs://``); the output directory must hold no Parquet
file yet (Ray appends, so a rerun into the same directory would duplicate rows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import PipelineConfig
from puregen_dist.data.io import COLUMNS, META_KEY
from puregen_dist.defenses import build_defense
from puregen_dist.pipeline.actors import EnergyActor, PurifierActor, data_defense_task, with_device
from puregen_dist.pipeline.models import resolve_models
from puregen_dist.pipeline.store import ROWS_PER_FILE, ROWS_PER_GROUP
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 64
"""Bytes per row beside the image (id, label, poisoned, offsets), for sizing read blocks."""
SCALAR_TYPES = {"id": pa.int64(), "label": pa.int64(), "poisoned": pa.bool_()}


RayPurifyConfig = PipelineConfig
"""Resources of the Ray Data purification: the ``pipeline`` config section (actors, batch_size,
num_cpus_per_actor, num_gpus_per_actor, cpu_tasks; ``address`` is used by :func:`ensure_ray` callers).
The actors must leave at least one CPU of the cluster free for the read/write tasks, or the pipeline hangs:
on 2 CPUs, 2 actors need ``num_cpus_per_actor=0.5`` (still one torch thread each)."""


@dataclass(frozen=True)
class PurifyStats:
    """Throughput of one purification: ``seconds`` is wall time of the Ray pipeline (all passes)."""

    images: int
    seconds: float
    images_per_second: float
    seconds_per_image_per_device: float
    """seconds x workers / images, workers = actors (generative) or task-pool size (CPU defenses)."""

    @classmethod
    def of(cls, images: int, seconds: float, workers: int) -> PurifyStats:
        rate = images / seconds if seconds > 0 else float("inf")
        return cls(images, seconds, rate, seconds * workers / max(images, 1))


@dataclass(frozen=True)
class ParquetInput:
    """A validated Parquet image set: its files, their common schema (metadata included) and size."""

    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    schema: pa.Schema
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    rows: int


# ------------------------------------------------------------------------------------------ Ray session


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray unless this process is already connected.

    No ``address`` and no ``RAY_ADDRESS``: a fresh local instance owned by this process
    (``address="local"``, so a stale ``/tmp/ray/ray_current_cluster`` is ignored), no dashboard. Ray 2.59+
    turns token authentication on for local clusters and writes a shared token to ``~/.ray/auth_token``
    (which concurrent fresh starts can race on); a process-private local instance defaults to
    ``RAY_AUTH_MODE=disabled`` unless the variable is already set. Otherwise it connects to the cluster
    (``num_cpus`` is then ignored) and, when a token is available (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), sends it (``RAY_AUTH_MODE=token``) unless
    ``RAY_AUTH_MODE`` says otherwise.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        log.info("starting a local Ray instance (num_cpus=%s)", num_cpus)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        return
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    if num_cpus is not None:
        log.warning("ensure_ray: num_cpus=%s ignored when connecting to %s", num_cpus, address)
    log.info("connecting to the Ray cluster at %s", address)
    ray.init(address=address)


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


# ------------------------------------------------------------------------------------------ inputs / outputs


def resolve_path(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a ``pyarrow.fs`` URI; an unusable URI is a
    UserInputError naming it."""
    if "://" not in str(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(str(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{path}: unreachable or unsupported storage URI ({exc})") from None


def list_parquet(fs: pafs.FileSystem, path: str) -> list[str]:
    """The Parquet files at ``path`` (itself, or every ``*.parquet`` below it, hidden ones skipped),
    sorted."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type != pafs.FileType.Directory:
            raise UserInputError(f"{path}: Parquet input not found")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UserInputError(f"{path}: cannot list ({exc})") from None
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                  and not f.base_name.startswith((".", "_")))


def inspect_input(path: str) -> ParquetInput:
    """Validate every file's schema (footer only) against the image-set schema of :mod:`puregen_dist.data.io`;
    errors name the offending file."""
    fs, root = resolve_path(path)
    files = list_parquet(fs, root)
    if not files:
        raise UserInputError(f"{path}: no Parquet files found")
    first: ParquetInput | None = None
    rows = 0
    for file in files:
        schema, count = _read_footer(fs, file)
        shape, classes = check_schema(file, schema)
        if first is not None and (shape, classes) != (first.shape, first.classes):
            raise UserInputError(f"{file}: image shape {shape} / classes differ from {files[0]} "
                                 f"({first.shape})")
        if first is None:  # the output schema: these columns and only our metadata (no stale ARROW:schema)
            clean = schema.remove_metadata().with_metadata({META_KEY: schema.metadata[META_KEY]})
            first = ParquetInput(fs, tuple(files), clean, shape, classes, 0)
        rows += count
    assert first is not None
    return ParquetInput(fs, tuple(files), first.schema, first.shape, first.classes, rows)


def _read_footer(fs: pafs.FileSystem, file: str) -> tuple[pa.Schema, int]:
    try:
        with fs.open_input_file(file) as handle:
            meta = pq.read_metadata(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{file}: not a readable Parquet file ({exc})") from None
    return meta.schema.to_arrow_schema(), meta.num_rows


def check_schema(file: str, schema: pa.Schema) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    """(shape, classes) of a file whose ``schema`` is an image set's; otherwise a UserInputError naming it."""
    expected = ("expected image fixed_size_list<uint8>[H*W*C], id int64, label int64, poisoned bool and the "
                "puregen_dist shape/classes metadata (files written by write_imageset)")
    missing = [c for c in COLUMNS if c not in schema.names]
    raw = (schema.metadata or {}).get(META_KEY)
    if missing or raw is None:
        raise UserInputError(f"{file}: not a puregen-dist image set (missing columns {missing} or metadata); "
                             f"{expected}")
    try:
        info = json.loads(raw)
        shape = tuple(int(v) for v in info["shape"])
        classes = tuple(str(c) for c in info["classes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{file}: unreadable puregen_dist metadata ({exc}); {expected}") from None
    image = schema.field("image").type
    wrong = [f"{name} is {schema.field(name).type}" for name, t in SCALAR_TYPES.items()
             if schema.field(name).type != t]
    if not (pa.types.is_fixed_size_list(image) and image.value_type == pa.uint8()
            and len(shape) == 3 and image.list_size == math.prod(shape)):
        wrong.insert(0, f"image is {image} for shape {list(shape)}")
    if wrong:
        raise UserInputError(f"{file}: wrong schema ({'; '.join(wrong)}); {expected}")
    return shape, classes  # type: ignore[return-value]


def prepare_output(output_dir: str) -> tuple[pafs.FileSystem, str]:
    """Create ``output_dir``; refuse one that already holds Parquet files (Ray would append duplicates)."""
    fs, root = resolve_path(output_dir)
    try:
        if fs.get_file_info(root).type == pafs.FileType.Directory and list_parquet(fs, root):
            raise UserInputError(f"{output_dir}: output directory already holds Parquet files; "
                                 "use a fresh directory")
        fs.create_dir(root, recursive=True)
    except OSError as exc:
        raise UserInputError(f"{output_dir}: cannot create the output directory ({exc})") from None
    return fs, root


# ------------------------------------------------------------------------------------------ defense


def defense_kind(defense_cfg: Any, source: ParquetInput) -> str:
    """Build the defense once on the driver, on CPU, so a missing checkpoint or a shape mismatch is a clear
    error before any Ray work; returns "generative", "filter" (PureGen-Filt) or "data" (CPU defense)."""
    defense = build_defense(with_device(defense_cfg, "cpu"))
    if hasattr(defense, "validate"):
        probe = ImageSet(np.zeros((1, *source.shape), np.uint8), np.zeros(1, np.int64), np.zeros(1, np.int64),
                         source.classes or ("0",))
        defense.validate(probe)
    if getattr(defense, "filter_by_energy", False):
        return "filter"
    if hasattr(defense, "purifier"):
        return "generative"
    if hasattr(defense, "apply"):
        return "data"
    raise UserInputError(f"defense {defense_cfg.name!r} is not a data defense (it has no apply())")


# ------------------------------------------------------------------------------------------ pipeline


def purify_parquet(input_path: str, output_dir: str, defense_cfg: Any, *, seed: int,
                   ray_cfg: RayPurifyConfig | None = None, store_uri: str | None = None) -> PurifyStats:
    """Purify the Parquet image set at ``input_path`` (a file or a directory of files) into Parquet files in
    ``output_dir`` (same schema and metadata, same rows and ids, images replaced); starts local Ray if needed.
    Model artifact keys in ``defense_cfg`` are looked up in ``store_uri`` (by the driver and by each actor).

    Raises UserInputError (naming the file, checkpoint or URI) before any Ray work for bad inputs.
    """
    ray_cfg = ray_cfg or RayPurifyConfig()
    source = inspect_input(input_path)
    kind = defense_kind(resolve_models(defense_cfg, store_uri), source)
    sink_fs, sink = prepare_output(output_dir)
    ensure_ray()
    if kind != "data":
        warn_if_starved(ray_cfg)
    log.info("purifying %d images (%d file(s), %s) with %s through Ray Data", source.rows, len(source.files),
             kind, defense_cfg.name)
    start = time.perf_counter()
    select = top_energy_ids(defense_cfg, source, ray_cfg, store_uri) if kind == "filter" else None
    dataset = read_dataset(source, ray_cfg)
    if kind == "data":
        dataset, workers = map_data_defense(dataset, defense_cfg, seed, source, ray_cfg), ray_cfg.cpu_tasks
    else:
        dataset = map_purifier(dataset, defense_cfg, seed, source, ray_cfg, select, store_uri)
        workers = ray_cfg.actors
    dataset.write_parquet(sink, filesystem=sink_fs, schema=source.schema,
                          min_rows_per_file=min(ROWS_PER_FILE, max(source.rows, 1)))
    stats = PurifyStats.of(source.rows, time.perf_counter() - start, workers)
    check_output_rows(sink_fs, sink, source.rows)
    log.info("purified %d images in %.1f s (%.1f images/s)", stats.images, stats.seconds,
             stats.images_per_second)
    return stats


def warn_if_starved(ray_cfg: RayPurifyConfig) -> None:
    """Warn when the actors would hold every CPU of the cluster: the read, repartition and write tasks (1 CPU
    each) could then never run and the pipeline would hang (seen on a 2-CPU machine with 2 actors x 1 CPU).
    Only a warning: an autoscaling cluster may add CPUs. Fix: ``num_cpus_per_actor=0.5`` still gives each
    actor one torch thread (Ray sets ``OMP_NUM_THREADS = max(floor(num_cpus), 1)``)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = ray_cfg.actors * ray_cfg.num_cpus_per_actor
    if total - held < 1:
        log.warning("%d actor(s) x %s CPU leave %.1f of the cluster's %.1f CPUs for the read/write tasks; the "
                    "pipeline will hang unless the cluster grows (lower num_cpus_per_actor, e.g. 0.5)",
                    ray_cfg.actors, ray_cfg.num_cpus_per_actor, max(total - held, 0.0), total)


def read_dataset(source: ParquetInput, ray_cfg: RayPurifyConfig) -> Any:
    """The input as a lazy Ray Dataset whose read tasks emit blocks of :func:`block_rows` rows, so that
    every actor gets work even from a single file and memory stays bounded as N grows.

    The read's ``target_max_block_size`` is set for this dataset only (the dataset keeps the context it was
    created with; the process-wide context is restored). This replaced a ``repartition`` step, whose worker
    held ~13x the input at 50,000 images (benchmarks/RESULTS.md (b)).
    """
    import ray

    context = ray.data.DataContext.get_current()
    previous = context.target_max_block_size
    rows = block_rows(source.rows, ray_cfg)
    context.target_max_block_size = rows * (math.prod(source.shape) + ROW_OVERHEAD_BYTES)
    try:
        return ray.data.read_parquet(list(source.files), filesystem=source.filesystem)
    finally:
        context.target_max_block_size = previous


def block_rows(total: int, ray_cfg: RayPurifyConfig) -> int:
    """Rows per read block: about four blocks per actor (load balance), at least one batch (per-block
    overhead), at most ``ROWS_PER_GROUP`` (memory)."""
    wanted = math.ceil(total / (4 * ray_cfg.actors))
    return max(1, min(max(wanted, ray_cfg.batch_size), ROWS_PER_GROUP))


def map_purifier(dataset: Any, defense_cfg: Any, seed: int, source: ParquetInput, ray_cfg: RayPurifyConfig,
                 select: np.ndarray | None = None, store_uri: str | None = None) -> Any:
    """``dataset`` through a pool of :class:`PurifierActor` (only ``select`` ids purified when given)."""
    kwargs = {"defense_cfg": defense_cfg, "seed": seed, "shape": source.shape, "store_uri": store_uri}
    if select is not None:
        kwargs["select_ids"] = select
    return dataset.map_batches(PurifierActor, fn_constructor_kwargs=kwargs, **actor_pool_args(ray_cfg))


def actor_pool_args(ray_cfg: RayPurifyConfig) -> dict[str, Any]:
    """``map_batches`` arguments of an actor-pool stage: pool size, resources per actor, explicit batch size,
    Arrow batches. Ray Data's defaults restart dead actors and retry their tasks (``max_restarts=-1``,
    ``max_task_retries=-1``), which the pipeline relies on to survive a killed actor."""
    import ray

    return {"batch_size": ray_cfg.batch_size, "batch_format": "pyarrow",
            "compute": ray.data.ActorPoolStrategy(size=ray_cfg.actors),
            "num_cpus": ray_cfg.num_cpus_per_actor, "num_gpus": ray_cfg.num_gpus_per_actor}


def map_data_defense(dataset: Any, defense_cfg: Any, seed: int, source: ParquetInput,
                     ray_cfg: RayPurifyConfig) -> Any:
    """``dataset`` through :func:`data_defense_task` on a task pool of ``cpu_tasks``."""
    import ray

    kwargs = {"defense_cfg": defense_cfg, "seed": seed, "shape": source.shape, "classes": source.classes}
    pool = ray.data.TaskPoolStrategy(size=ray_cfg.cpu_tasks)
    return dataset.map_batches(data_defense_task, fn_kwargs=kwargs, batch_size=ray_cfg.batch_size,
                               batch_format="pyarrow", compute=pool, num_cpus=1)


def top_energy_ids(defense_cfg: Any, source: ParquetInput, ray_cfg: RayPurifyConfig,
                   store_uri: str | None = None) -> np.ndarray:
    """PureGen-Filt's first pass: (id, energy) of every row through :class:`EnergyActor`, then the ids of the
    ``round(filter_fraction * N)`` (>= 1) highest energies (ties: smaller id first), sorted."""
    kwargs = {"defense_cfg": defense_cfg, "shape": source.shape, "store_uri": store_uri}
    energies = read_dataset(source, ray_cfg).map_batches(EnergyActor, fn_constructor_kwargs=kwargs,
                                                         **actor_pool_args(ray_cfg))
    ids, values = [], []
    for batch in energies.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(batch["id"])
        values.append(batch["energy"])
    ids_all, energy = np.concatenate(ids).astype(np.int64), np.concatenate(values)
    if len(np.unique(ids_all)) != len(ids_all):
        raise UserInputError("input image set has duplicate ids")
    k = max(1, int(round(defense_cfg.filter_fraction * len(ids_all))))
    order = np.lexsort((ids_all, -energy.astype(np.float64)))
    log.info("puregen_filt: purifying the %d highest-energy of %d images", k, len(ids_all))
    return np.sort(ids_all[order[:k]])


def check_output_rows(fs: pafs.FileSystem, root: str, expected: int) -> None:
    """The written files hold ``expected`` rows in all (footers only), else RuntimeError."""
    written = sum(_read_footer(fs, f)[1] for f in list_parquet(fs, root))
    if written != expected:
        raise RuntimeError(f"{root}: wrote {written} rows for {expected} input rows")


# ------------------------------------------------------------------------------------------ reading back


def read_purified(output_dir: str, shape: tuple[int, int, int] | None = None,
                  classes: tuple[str, ...] | None = None) -> tuple[ImageSet, np.ndarray]:
    """(ImageSet sorted by id, poisoned flags (N,) bool) from every Parquet file in ``output_dir``.

    ``shape`` / ``classes`` default to the files' metadata (needed only for files without it). Loads the whole
    set into memory; duplicate ids are an error.
    """
    fs, root = resolve_path(output_dir)
    files = list_parquet(fs, root)
    if not files:
        raise UserInputError(f"{output_dir}: no Parquet files found")
    tables = [_read_table(fs, f) for f in files]
    info = json.loads((tables[0].schema.metadata or {}).get(META_KEY, b"{}"))
    shape = tuple(shape or info.get("shape") or ())
    classes = tuple(classes or info.get("classes") or ())
    if len(shape) != 3 or not classes:
        raise UserInputError(f"{output_dir}: no shape/classes metadata; pass shape and classes")
    table = pa.concat_tables([t.select(list(COLUMNS)).replace_schema_metadata(None) for t in tables])
    table = table.sort_by("id")
    ids = table.column("id").to_numpy().astype(np.int64)
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        dup = ids[1:][ids[1:] == ids[:-1]]
        raise UserInputError(f"{output_dir}: {len(dup)} duplicate id(s), e.g. {dup[:5].tolist()}")
    images = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, *shape)
    labels = table.column("label").to_numpy().astype(np.int64)
    data = ImageSet(np.ascontiguousarray(images, dtype=np.uint8), labels, ids, classes)
    return data, table.column("poisoned").to_numpy(zero_copy_only=False).astype(bool)


def _read_table(fs: pafs.FileSystem, file: str) -> pa.Table:
    try:
        table = pq.read_table(file, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"{file}: not a readable Parquet file ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise UserInputError(f"{file}: missing columns {missing}")
    return table
