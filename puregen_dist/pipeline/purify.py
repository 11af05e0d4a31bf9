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

import atexit
import logging
import math
import os
import secrets
import shutil
import tempfile
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
from puregen_dist.config.identity import with_device
from puregen_dist.data.io import META_KEY, check_schema, parquet_files, read_imageset, resolve_path
from puregen_dist.defenses import build_defense
from puregen_dist.pipeline.actors import EnergyActor, PurifierActor, data_defense_task
from puregen_dist.pipeline.isolation import local_ray_options
from puregen_dist.pipeline.models import resolve_models
from puregen_dist.pipeline.store import ROWS_PER_FILE, ROWS_PER_GROUP
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 64
"""Bytes per row beside the image (id, label, poisoned, offsets), for sizing read blocks."""


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
    selected_ids: np.ndarray | None = None
    """The ids a ``rank_by_energy`` defense purified (None: every row)."""

    @classmethod
    def of(cls, images: int, seconds: float, workers: int, selected_ids: np.ndarray | None = None) -> PurifyStats:
        rate = images / seconds if seconds > 0 else float("inf")
        return cls(images, seconds, rate, seconds * workers / max(images, 1), selected_ids)


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
    (``address="local"``, so a stale ``/tmp/ray/ray_current_cluster`` is ignored), no dashboard, with token
    authentication on (:func:`enable_local_token_auth`): Ray's GCS, raylet, workers and agents listen on all
    network interfaces (Ray 2.60 has no reliable loopback-only option), so without a token anyone on the
    network could submit work to it (the CLI also runs such a command in a private network namespace by
    default: :mod:`puregen_dist.pipeline.isolation`). Otherwise it connects to the cluster (``num_cpus`` is then ignored)
    and, when a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``),
    sends it (``RAY_AUTH_MODE=token``) unless ``RAY_AUTH_MODE`` says otherwise.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        enable_local_token_auth()
        log.info("starting a local Ray instance (num_cpus=%s, token authentication %s)", num_cpus,
                 os.environ.get("RAY_AUTH_MODE"))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **local_ray_options())
        return
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: connecting to %s without a token (a cluster with token "
                    "authentication on refuses this; one with it off accepts work from anyone who reaches it)",
                    address)
    if num_cpus is not None:
        log.warning("ensure_ray: num_cpus=%s ignored when connecting to %s", num_cpus, address)
    log.info("connecting to the Ray cluster at %s", address)
    try:
        ray.init(address=address)
    except Exception as exc:
        if "authenticat" not in str(exc).lower() and "unauthorized" not in str(exc).lower():
            raise
        raise UserInputError(
            f"the Ray cluster at {address} refused this client: {str(exc).splitlines()[0][:300]}. Give the "
            "cluster's token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<file> (or RAY_AUTH_TOKEN=<token>), "
            "the same token the head was started with (`ray get-auth-token` on the head prints it)") from None


def enable_local_token_auth() -> None:
    """Turn Ray's token authentication on for a local instance this process is about to start: a fresh
    random token in a private file (mode 0600, in a 0700 directory removed at exit), exported as
    ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` so that the instance and every worker it starts (which
    inherit the environment) require it. A token the user configured (``RAY_AUTH_MODE=token`` with
    ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) is kept; ``RAY_AUTH_MODE=disabled`` is respected with a
    warning. A per-process file, not ``~/.ray/auth_token``, so concurrent fresh starts never race on it."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: the local Ray instance accepts work from anyone who can reach "
                    "this machine's ports (Ray listens on all interfaces); unset it to use a private token")
        return
    if mode == "token" and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        return
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _private_token_file()
    os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_auth_config()


def _refresh_ray_auth_config() -> None:
    """Make an already imported Ray see the new ``RAY_AUTH_*`` variables: Ray caches its C++ config and the
    token when it is imported, and re-reads them this way itself when it turns token mode on (Ray 2.60,
    ``ray._private.authentication.authentication_token_setup``)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _private_token_file() -> str:
    """A new file holding 64 random hex digits, readable by this user only; removed at interpreter exit."""
    directory = tempfile.mkdtemp(prefix="puregen-ray-auth-")  # mode 0700
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = os.path.join(directory, "token")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


# ------------------------------------------------------------------------------------------ inputs / outputs


def inspect_input(path: str) -> ParquetInput:
    """Validate every file's schema (footer only) against the image-set schema of :mod:`puregen_dist.data.io`;
    errors name the offending file."""
    fs, root = resolve_path(path)
    files = parquet_files(fs, root)
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


def prepare_output(output_dir: str) -> tuple[pafs.FileSystem, str]:
    """Create ``output_dir``; refuse one that already holds Parquet files (Ray would append duplicates)."""
    fs, root = resolve_path(output_dir)
    try:
        if fs.get_file_info(root).type == pafs.FileType.Directory and parquet_files(fs, root):
            raise UserInputError(f"{output_dir}: output directory already holds Parquet files; "
                                 "use a fresh directory")
        fs.create_dir(root, recursive=True)
    except OSError as exc:
        raise UserInputError(f"{output_dir}: cannot create the output directory ({exc})") from None
    return fs, root


# ------------------------------------------------------------------------------------------ defense


def validate_defense(defense_cfg: Any, source: ParquetInput) -> None:
    """Check the defense against the data on the driver, before any Ray work: a defense that makes no
    purified set (``pipeline: none``) is refused; the others are built once on CPU (a missing checkpoint or a
    model/data shape mismatch is a clear error) and asked to ``validate`` a probe of the data's shape."""
    if defense_cfg.pipeline == "none":
        raise UserInputError(f"defense {defense_cfg.name!r} makes no purified set (it acts during training or "
                             "not at all); purify needs a data defense")
    if defense_cfg.pipeline == "whole_set":
        raise UserInputError(f"defense {defense_cfg.name!r} filters the whole set at once (it trains a detector "
                             "on it); run it through the artifact store (`puregen-dist purify` with a store, or "
                             "a sweep), not as a Ray Data stream over a Parquet file")
    defense = build_defense(with_device(defense_cfg, "cpu"))
    probe = ImageSet(np.zeros((1, *source.shape), np.uint8), np.zeros(1, np.int64), np.zeros(1, np.int64),
                     source.classes or ("0",))
    defense.validate(probe)


# ------------------------------------------------------------------------------------------ pipeline


def purify_parquet(input_path: str, output_dir: str, defense_cfg: Any, *, seed: int,
                   ray_cfg: RayPurifyConfig | None = None, store_uri: str | None = None,
                   select_ids: np.ndarray | None = None) -> PurifyStats:
    """Purify the Parquet image set at ``input_path`` (a file or a directory of files) into Parquet files in
    ``output_dir`` (same schema and metadata, same rows and ids, images replaced); starts local Ray if needed.
    Model artifact keys in ``defense_cfg`` are looked up in ``store_uri`` (by the driver and by each actor).
    ``select_ids`` replaces the energy ranking of a ``rank_by_energy`` defense (only those rows purified).

    Raises UserInputError (naming the file, checkpoint or URI) before any Ray work for bad inputs.
    """
    ray_cfg = ray_cfg or RayPurifyConfig()
    source = inspect_input(input_path)
    validate_defense(resolve_models(defense_cfg, store_uri), source)
    kind = defense_cfg.pipeline
    sink_fs, sink = prepare_output(output_dir)
    ensure_ray()
    if kind == "actor_pool":
        warn_if_starved(ray_cfg)
    log.info("purifying %d images (%d file(s)) with %s on a Ray Data %s", source.rows, len(source.files),
             defense_cfg.name, kind.replace("_", " "))
    start = time.perf_counter()
    if select_ids is not None and defense_cfg.pipeline != "actor_pool":
        raise ValueError(f"select_ids: defense {defense_cfg.name!r} purifies every row (it runs on a task pool)")
    select = select_ids
    if select is None and defense_cfg.rank_by_energy:
        select = top_energy_ids(defense_cfg, source, ray_cfg, store_uri)
    dataset = read_dataset(source, ray_cfg)
    if kind == "task_pool":
        dataset, workers = map_data_defense(dataset, defense_cfg, seed, source, ray_cfg), ray_cfg.cpu_tasks
    else:
        dataset = map_purifier(dataset, defense_cfg, seed, source, ray_cfg, select, store_uri)
        workers = ray_cfg.actors
    dataset.write_parquet(sink, filesystem=sink_fs, schema=source.schema,
                          min_rows_per_file=min(ROWS_PER_FILE, max(source.rows, 1)))
    stats = PurifyStats.of(source.rows, time.perf_counter() - start, workers, select)
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
    held ~13x the input at 50,000 images (docs/benchmarks_history.md, Ray Data (b)).
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
            "num_cpus": ray_cfg.num_cpus_per_actor, "num_gpus": ray_cfg.num_gpus_per_actor,
            **_custom_resources(ray_cfg)}


def _custom_resources(ray_cfg: RayPurifyConfig) -> dict[str, Any]:
    """``map_batches``' ``resources`` argument when the pipeline names custom resources."""
    return {"resources": dict(ray_cfg.resources_per_actor)} if ray_cfg.resources_per_actor else {}


def map_data_defense(dataset: Any, defense_cfg: Any, seed: int, source: ParquetInput,
                     ray_cfg: RayPurifyConfig) -> Any:
    """``dataset`` through :func:`data_defense_task` on a task pool of ``cpu_tasks``."""
    import ray

    kwargs = {"defense_cfg": defense_cfg, "seed": seed, "shape": source.shape, "classes": source.classes}
    pool = ray.data.TaskPoolStrategy(size=ray_cfg.cpu_tasks)
    return dataset.map_batches(data_defense_task, fn_kwargs=kwargs, batch_size=ray_cfg.batch_size,
                               batch_format="pyarrow", compute=pool, num_cpus=1, **_custom_resources(ray_cfg))


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


def energy_selection(input_path: str, defense_cfg: Any, ray_cfg: RayPurifyConfig,
                     store_uri: str | None = None) -> np.ndarray:
    """The sorted ids a ``rank_by_energy`` defense (PureGen-Filt) purifies in the Parquet image set at
    ``input_path``: :func:`top_energy_ids`, after the same input and model checks as :func:`purify_parquet`."""
    source = inspect_input(input_path)
    validate_defense(resolve_models(defense_cfg, store_uri), source)
    ensure_ray()
    return top_energy_ids(defense_cfg, source, ray_cfg, store_uri)


def check_output_rows(fs: pafs.FileSystem, root: str, expected: int) -> None:
    """The written files hold ``expected`` rows in all (footers only), else RuntimeError."""
    written = sum(_read_footer(fs, f)[1] for f in parquet_files(fs, root))
    if written != expected:
        raise RuntimeError(f"{root}: wrote {written} rows for {expected} input rows")


# ------------------------------------------------------------------------------------------ reading back


def read_purified(output_dir: str, shape: tuple[int, int, int] | None = None,
                  classes: tuple[str, ...] | None = None) -> tuple[ImageSet, np.ndarray]:
    """(ImageSet sorted by id, poisoned flags (N,) bool) from every Parquet file in ``output_dir``
    (:func:`~puregen_dist.data.io.read_imageset`).

    ``shape`` / ``classes`` override the files' metadata (needed only for files without it). Loads the whole
    set into memory; duplicate ids are an error.
    """
    return read_imageset(output_dir, shape=shape, classes=classes)
