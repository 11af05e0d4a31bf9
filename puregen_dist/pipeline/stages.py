"""Pipeline stages as cached artifacts (DESIGN §2): generative models, poison sets and purified sets, each
built once per content key in the artifact store and skipped when it exists.

The driver checks the store first; a hit submits nothing. A miss runs the work on the cluster: model training
and poison crafting as one Ray task each (resources from config, retried on worker loss), purification
through Ray Data. Each task builds and commits its artifact itself (``ArtifactStore.get_or_build``), so it
runs on any node that reaches the store URI and a crash never leaves a readable half artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import CraftJob, ModelJob, PurifyJob, TaskResources
from puregen_dist.config.identity import with_device
from puregen_dist.config.loading import key_dict
from puregen_dist.config.schema import NoAttackConfig
from puregen_dist.data.io import read_imageset
from puregen_dist.generative.noise import NOISE_SOURCE
from puregen_dist.pipeline.actors import ray_device
from puregen_dist.pipeline.keys import model_artifact
from puregen_dist.pipeline.models import file_fingerprints, model_fingerprints, resolve_models
from puregen_dist.pipeline.purify import PurifyStats, energy_selection, ensure_ray, purify_parquet
from puregen_dist.pipeline.reference import import_reference, reference_for_key
from puregen_dist.pipeline.store import ArtifactStore, StagedArtifact, StoreError, artifact_key
from puregen_dist.plugins import load_plugins
from puregen_dist.registry import MODELS
from puregen_dist.types import ImageSet, TargetSpec

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """A stage's artifact key, manifest, and whether this call built it (False: cache hit)."""

    key: str
    manifest: dict[str, Any]
    built: bool


# ------------------------------------------------------------------------------------------ Ray tasks


def submit_task(fn: Callable[..., Any], resources: TaskResources, *args: Any) -> Any:
    """``fn(*args)`` submitted as one Ray task with ``resources``; returns its ObjectRef (Ray must be up)."""
    import ray

    warn_if_infeasible(resources)
    return ray.remote(**resources.ray_options())(fn).remote(*args)


def task_result(ref: Any) -> Any:
    """The result of a submitted task. A UserInputError raised in the task is re-raised as itself (a
    one-paragraph message, exit 2), not wrapped in Ray's traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserInputError):
            raise exc.cause from None
        raise


def run_task(fn: Callable[..., Any], resources: TaskResources, *args: Any, address: str | None = None) -> Any:
    """``fn(*args)`` as one Ray task with ``resources`` (starting or joining Ray first); returns its result."""
    ensure_ray(address)
    return task_result(submit_task(fn, resources, *args))


def warn_if_infeasible(resources: TaskResources) -> None:
    """Warn when the cluster has fewer CPUs/GPUs in all than the task requests: Ray then waits (for an
    autoscaler to add nodes) instead of failing, which looks like a hang on a fixed cluster or a laptop."""
    import ray

    total = ray.cluster_resources()
    for name, need in (("CPU", resources.num_cpus), ("GPU", resources.num_gpus), *resources.resources.items()):
        if need > total.get(name, 0.0):
            log.warning("the task requests %s %s but the cluster has %s; it waits until a node with enough "
                        "resources joins (lower the task's num_cpus / num_gpus / resources)",
                        need, name, total.get(name, 0.0))


@contextlib.contextmanager
def task_logging(enabled: bool) -> Iterator[None]:
    """While a Ray task body runs, send this package's INFO logs (training epochs, crafting rounds) to stderr,
    which Ray forwards to the driver, so the progress of a long single task (``craft``, ``train-* --store``)
    shows where the user started it; off for a sweep's tasks, whose stages have progress bars. A process whose
    logging is configured already (the CLI, a test run calling the body directly) is left as it is; everything
    is restored afterwards."""
    package = logging.getLogger("puregen_dist")
    if not enabled or logging.getLogger().handlers or package.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def cached_or_task(store: ArtifactStore, key: str, fn: Callable[..., tuple[dict[str, Any], bool]],
                   resources: TaskResources, *args: Any, address: str | None = None) -> StageResult:
    """The committed artifact ``key`` (when it passes its checksums), or the result of the task ``fn(*args)``
    that builds it (a corrupt one is set aside and rebuilt: ``ArtifactStore.reusable``)."""
    if store.reusable(key):
        log.info("%s: in the store, skipped", key)
        return StageResult(key, store.manifest(key), False)
    log.info("%s: building as a Ray task (%s CPU, %s GPU)", key, resources.num_cpus, resources.num_gpus)
    manifest, built = run_task(fn, resources, *args, address=address)
    if manifest.get("key") != key:
        raise StoreError(f"{key}: the task that builds it computed the key {manifest.get('key')} instead: it sees "
                         "different inputs than this process (a relative path resolved elsewhere, a file changed "
                         "meanwhile, or another version of the code on that node)")
    return StageResult(key, manifest, built)


# ------------------------------------------------------------------------------------------ models


def model_stage(job: ModelJob, store: ArtifactStore, *, tracking_dir: str | Path,
                address: str | None = None, progress: bool = False) -> StageResult:
    """The model artifact of ``job``: imported from a shipped reference model with the same key when there is
    one (:mod:`puregen_dist.pipeline.reference`), else trained in a Ray task with ``job.resources``, once per key.

    ``tracking_dir`` holds the default MLflow database of the training run (absolute, shared with the task).
    """
    _, key, _ = model_artifact(job)
    reference = reference_for_key(key)
    if reference is not None and not store.reusable(key):
        log.info("%s: importing the shipped reference model %s instead of training", key, reference.name)
        manifest = store.manifest(import_reference(reference, store)[0])
        return StageResult(key, manifest, True)
    return cached_or_task(store, key, build_model_artifact, job.resources, job, store.uri,
                          str(Path(tracking_dir).absolute()), progress, address=address)


def build_model_artifact(job: ModelJob, store_uri: str, tracking_dir: str, progress: bool = False
                         ) -> tuple[dict[str, Any], bool]:
    """Train ``job``'s model and commit it under its key (the body of the Ray task; callable directly);
    ``progress``: log its epochs to the driver (:func:`task_logging`).

    Training writes checkpoints into a node-local work directory named by the key, so a retried task on the
    same node resumes from its last epoch; the directory is removed once the artifact is committed.
    """
    from puregen_dist.jobs import training_data
    from puregen_dist.tracking import open_tracker

    load_plugins()
    trainer = MODELS.get(job.model_kind).builder
    store = ArtifactStore(store_uri)
    kind, key, config = model_artifact(job)
    work = Path(tempfile.gettempdir()) / "puregen-work" / key
    # device "auto" becomes the device Ray assigned the task (CUDA only with a GPU assignment)
    job = with_device(dataclasses.replace(job, output=str(work)), ray_device(), only_auto=True)

    def build(staged: StagedArtifact) -> dict[str, Any]:
        start = time.perf_counter()
        data = training_data(resolve_models(job, store, "job"))  # train_on: a poison key -> its directory
        with open_tracker(job.tracking, tracking_dir, default_run_name=job.name) as tracker:
            path = trainer(job, tracker, data)
        store.stage_dir(staged, path)
        return {"timings": {"train_s": time.perf_counter() - start}}

    with task_logging(progress):
        result = store.get_or_build(key, build, kind=kind, config=config)
    shutil.rmtree(work, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ poison sets


def poison_artifact(job: PurifyJob | CraftJob) -> tuple[str, dict[str, Any]]:
    """(key, keyed config) of the poisoned training set of (data, attack, seed)."""
    config = {"data": key_dict(job.data), "attack": key_dict(job.attack), "seed": job.seed}
    if models := model_fingerprints(job.attack):  # attacks that use trained models (surrogates)
        config["models"] = models
    if files := file_fingerprints(job.attack):  # imported poisons: the files' content, not only their path
        config["files"] = files
    return artifact_key("poison", config), config


def poison_stage(job: PurifyJob | CraftJob, store: ArtifactStore, *, progress: bool = False) -> StageResult:
    """The poisoned training set, crafted in a Ray task with ``pipeline.craft`` resources once per key."""
    key, _ = poison_artifact(job)
    return cached_or_task(store, key, build_poison_artifact, job.pipeline.craft, job, store.uri, progress,
                          address=job.pipeline.address)


def build_poison_artifact(job: PurifyJob | CraftJob, store_uri: str, progress: bool = False
                          ) -> tuple[dict[str, Any], bool]:
    """Load the data, craft the poison and commit the poisoned set (the body of the Ray task); ``progress``: log
    the crafting to the driver (:func:`task_logging`)."""
    from puregen_dist.attacks import build_attack
    from puregen_dist.data.datasets import load_data

    load_plugins()
    store = ArtifactStore(store_uri)
    key, config = poison_artifact(job)
    # device "auto" becomes the device Ray assigned the task (CUDA only with a GPU assignment)
    attack_cfg = with_device(resolve_models(job.attack, store, "attack"), ray_device(), only_auto=True)

    def build(staged: StagedArtifact) -> dict[str, Any]:
        train, test = load_data(job.data)
        poison = build_attack(attack_cfg).craft(train, seed=job.seed, test=test)
        rows = store.stage_imageset(staged, poison.materialize(), poisoned_ids=poison.poison_ids)
        stage_target(store, staged, poison.target, poison.eps)
        numbers = {k: float(v) for k, v in poison.meta.items() if isinstance(v, int | float) and k != "craft_seconds"}
        return {"rows": rows, "timings": {"craft_s": float(poison.meta.get("craft_seconds", 0.0))},
                "stats": numbers}

    with task_logging(progress):
        return store.get_or_build(key, build, kind="poison", config=config)


TARGET_JSON = "target.json"
TARGET_TENSORS = "target.safetensors"
_TARGET_ARRAYS = ("trigger", "trigger_mask", "target_ids", "target_images", "target_labels")


def stage_target(store: ArtifactStore, staged: StagedArtifact, target: TargetSpec, eps: float) -> None:
    """Store what the attack aims at beside the poisoned set: scalars as ``target.json``, the trigger
    (H, W, C) float32, its mask, the target ids and the target images (T, H, W, C) uint8 with their true
    labels (T,) int64 as ``target.safetensors`` (what a trial needs to measure poison success)."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(value) for name in _TARGET_ARRAYS
              if (value := getattr(target, name)) is not None}
    scalars = {"kind": target.kind, "target_class": target.target_class,
               "adversarial_label": target.adversarial_label, "eps": float(eps)}
    store.stage_bytes(staged, TARGET_JSON, json.dumps(scalars, sort_keys=True).encode())
    if arrays:
        store.stage_bytes(staged, TARGET_TENSORS, save(arrays))


def read_target(store: ArtifactStore, poison_key: str) -> TargetSpec:
    """The TargetSpec stored with poison set ``poison_key`` (see :func:`stage_target`)."""
    from safetensors.numpy import load

    scalars = json.loads(store.read_bytes(poison_key, TARGET_JSON))
    files = store.manifest(poison_key)["files"]
    arrays = load(store.read_bytes(poison_key, TARGET_TENSORS)) if TARGET_TENSORS in files else {}
    return TargetSpec(kind=scalars["kind"], target_class=scalars["target_class"],
                      adversarial_label=scalars["adversarial_label"],
                      **{name: arrays.get(name) for name in _TARGET_ARRAYS})


# ------------------------------------------------------------------------------------------ purified sets


def purified_artifact(job: PurifyJob, poison_key: str) -> tuple[str, dict[str, Any]]:
    """(key, keyed config) of the purified set of (poison set, defense, models, seed, and the version of the
    noise scheme for a defense that draws random streams)."""
    config = {"defense": key_dict(job.defense), "seed": job.seed, "models": model_fingerprints(job.defense)}
    if job.defense.random_streams:
        config["noise"] = NOISE_SOURCE
    return artifact_key("purified", config, inputs=[poison_key]), config


def clean_source(job: PurifyJob) -> PurifyJob | None:
    """The job whose poison set is ``job``'s clean training set (attack ``none``, same data, seed, defense and
    pipeline) when ``job``'s purified set can be assembled from the clean set's purified rows: a row-wise
    defense (``DefenseConfig.rowwise``) on a poisoned set. None otherwise (purify the whole set)."""
    if not job.defense.rowwise or job.attack.name == NoAttackConfig.name:
        return None
    return dataclasses.replace(job, attack=NoAttackConfig())


def purify_stage(job: PurifyJob, poison_key: str, store: ArtifactStore) -> StageResult:
    """The purified set of (poison set, defense, models, seed), once per key. Model references may be
    checkpoint directories or model artifact keys of ``store``.

    A row-wise defense purifies each image once (PUREGEN_REFERENCE §5.6): the clean training set is purified
    once per (data, defense, models, seed) -- itself a cached purified set, shared by every poison set -- and a
    poison set only purifies its rows that differ from the clean set (the poisons); the two are assembled by
    id. Purification being a function of (image, id, seed), the result equals purifying the whole poison set
    (same key); its manifest's ``stats`` say how many rows were purified and how many reused.
    """
    key, config = purified_artifact(job, poison_key)
    if store.reusable(key):
        return StageResult(key, store.manifest(key), False)
    clean_job = clean_source(job)
    clean: tuple[str, str] | None = None
    if clean_job is not None:
        clean_poison = poison_stage(clean_job, store).key
        clean = clean_poison, purify_stage(clean_job, clean_poison, store).key

    def build(staged: StagedArtifact) -> dict[str, Any]:
        ensure_ray(job.pipeline.address)
        if clean is not None:
            return assemble_purified(job, poison_key, *clean, store, staged)
        if job.defense.pipeline == "whole_set":
            return filter_whole(job, poison_key, store, staged)
        return purify_whole(job, poison_key, store, staged)

    manifest, built = store.get_or_build(key, build, kind="purified", config=config, inputs=[poison_key])
    return StageResult(key, manifest, built)


def purify_whole(job: PurifyJob, poison_key: str, store: ArtifactStore, staged: StagedArtifact) -> dict[str, Any]:
    """Purify every row of ``poison_key`` into ``staged`` through Ray Data (a ``rank_by_energy`` defense: its
    ranking pass and the selected rows, the selection recorded beside them); the build result."""
    stats = purify_parquet(store.imageset_path(poison_key, verify=True), staged.uri, job.defense, seed=job.seed,
                           ray_cfg=job.pipeline, store_uri=store.uri)
    counts = {"rows_purified": float(stats.images), "rows_reused": 0.0}
    if stats.selected_ids is not None:
        stage_selection(store, staged, stats.selected_ids)
        selected = len(stats.selected_ids)
        counts.update(rows_purified=float(selected), rows_unselected=float(stats.images - selected))
    return {"rows": stats.images, "timings": _purify_timings(stats), "stats": counts}


FILTER_JSON = "filter.json"
"""Beside a filter's (``whole_set``) purified set: the ids it removed and the key of its detector."""


def filter_whole(job: PurifyJob, poison_key: str, store: ArtifactStore, staged: StagedArtifact) -> dict[str, Any]:
    """Stage the rows of ``poison_key`` that the filter ``job.defense`` keeps (one Ray task with a purifier
    actor's resources trains or reuses the detector and flags rows); the manifest's stats say how many rows
    were removed and, the poisons being known, the removal's precision and recall."""
    from puregen_dist.defenses.training_time import removal_metrics
    from puregen_dist.pipeline.filters import filter_in_task

    start = time.perf_counter()
    result = task_result(submit_task(filter_in_task, job.pipeline.actor_resources(), job.defense, job.seed,
                                     poison_key, store.uri))
    poisoned, flags = store.get_imageset(poison_key)
    keep = np.isin(poisoned.ids, result["kept_ids"])
    rows = store.stage_imageset(staged, poisoned.take(np.flatnonzero(keep)), poisoned_ids=poisoned.ids[flags & keep])
    store.stage_bytes(staged, FILTER_JSON, json.dumps(
        {"detector": result["detector"], "removed_ids": [int(i) for i in result["removed_ids"]]}).encode())
    stats = removal_metrics(poisoned.ids, result["kept_ids"], poisoned.ids[flags])
    seconds = time.perf_counter() - start
    log.info("%s: %s removed %d of %d rows (%d of %d poisons); detector %s %s", staged.key, job.defense.name,
             len(poisoned) - rows, len(poisoned), int(stats["poisons_removed"]), int(flags.sum()),
             result["detector"], "trained" if result["detector_trained"] else "reused")
    return {"rows": rows, "stats": {**stats, "detector_trained": float(result["detector_trained"])},
            "timings": {"purify_s": seconds, "detector_s": result["detector_s"], "flag_s": result["flag_s"],
                        "images_per_second": len(poisoned) / seconds if seconds > 0 else 0.0}}


def _purify_timings(stats: PurifyStats) -> dict[str, float]:
    return {"purify_s": stats.seconds, "images_per_second": stats.images_per_second,
            "seconds_per_image_per_device": stats.seconds_per_image_per_device}


def assemble_purified(job: PurifyJob, poison_key: str, clean_key: str, clean_purified_key: str,
                      store: ArtifactStore, staged: StagedArtifact) -> dict[str, Any]:
    """Stage the purified set of ``poison_key``: rows identical to the clean set ``clean_key`` (same id, same
    bytes) take their image from its purified set ``clean_purified_key``; the other rows (poisons, and any
    row an attack added or changed) are purified now through the same Ray Data pipeline. Labels, ids and
    poisoned flags are the poison set's.

    A defense that ranks by energy (PureGen-Filt) purifies only the rows its ranking of *this* set selects:
    a selected row is reused when it is unchanged and the clean purified set purified it too (its recorded
    selection, :data:`SELECTION_JSON`), purified now otherwise; unselected rows keep the poison set's image."""
    start = time.perf_counter()
    poisoned, flags = store.get_imageset(poison_key)
    clean, _ = store.get_imageset(clean_key)
    changed = changed_rows(poisoned, clean)
    del clean
    todo, reuse = changed, ~changed
    if job.defense.rank_by_energy:
        # the poison set's files were verified by get_imageset just above
        select = energy_selection(store.imageset_path(poison_key), job.defense, job.pipeline, store.uri)
        stage_selection(store, staged, select)
        selected = np.isin(poisoned.ids, select)
        clean_selected = np.isin(poisoned.ids, read_selection(store, clean_purified_key, clean_key, job))
        todo, reuse = selected & (changed | ~clean_selected), selected & ~changed & clean_selected
    images = poisoned.images.copy()
    if todo.any():
        images[todo], _ = purify_rows(job, poisoned.take(todo), flags[todo], store, staged.key)
    if reuse.any():
        purified_clean, _ = store.get_imageset(clean_purified_key)
        images[reuse] = purified_clean.images[purified_clean.positions(poisoned.ids[reuse])]
    rows = store.stage_imageset(staged, poisoned.replace(images=images), poisoned_ids=poisoned.ids[flags])
    log.info("%s: purified %d rows, reused %d purified clean rows of %s", staged.key, int(todo.sum()),
             int(reuse.sum()), clean_purified_key)
    stats = {"rows_purified": float(todo.sum()), "rows_reused": float(reuse.sum())}
    if job.defense.rank_by_energy:
        stats["rows_unselected"] = float(len(poisoned) - todo.sum() - reuse.sum())
    return {"rows": rows, "timings": _assembled_timings(store.manifest(clean_purified_key),
                                                        time.perf_counter() - start, rows),
            "stats": stats}


SELECTION_JSON = "selected_ids.json"
"""Beside a ``rank_by_energy`` defense's purified set: the ids it purified (the others are the input's rows)."""


def stage_selection(store: ArtifactStore, staged: StagedArtifact, select: np.ndarray) -> None:
    """Record which ids a ``rank_by_energy`` defense purified, with its purified set."""
    store.stage_bytes(staged, SELECTION_JSON, json.dumps([int(i) for i in select]).encode())


def read_selection(store: ArtifactStore, purified_key: str, poison_key: str, job: PurifyJob) -> np.ndarray:
    """The ids the purified set ``purified_key`` purified (:func:`stage_selection`); for a set stored without
    the record, its ranking of ``poison_key`` again."""
    if SELECTION_JSON in store.manifest(purified_key).get("files", {}):
        return np.asarray(json.loads(store.read_bytes(purified_key, SELECTION_JSON)), dtype=np.int64)
    return energy_selection(store.imageset_path(poison_key, verify=True), job.defense, job.pipeline, store.uri)


def _assembled_timings(clean: dict[str, Any], spent: float, rows: int) -> dict[str, float]:
    """Timings of an assembled purified set, as if it had been purified whole (what a trial reports as its
    defense cost): the clean set's purification plus this set's own work (``changed_rows_purify_s``: reading,
    ranking, purifying its rows)."""
    total = float(clean.get("timings", {}).get("purify_s", 0.0)) + spent
    timings = {"purify_s": total, "changed_rows_purify_s": spent}
    if total > 0:
        timings["images_per_second"] = rows / total
    if "seconds_per_image_per_device" in clean.get("timings", {}):
        timings["seconds_per_image_per_device"] = clean["timings"]["seconds_per_image_per_device"]
    return timings


def changed_rows(data: ImageSet, clean: ImageSet) -> np.ndarray:
    """(N,) bool over ``data``'s rows: True where ``clean`` has no row with the same id, or its image differs
    in any byte. Both sets sorted by id (as the store reads them)."""
    if len(clean) == 0:
        return np.ones(len(data), dtype=bool)
    at = np.clip(np.searchsorted(clean.ids, data.ids), 0, len(clean) - 1)
    same = clean.ids[at] == data.ids
    rows = np.flatnonzero(same)
    same[rows] = (clean.images[at[rows]] == data.images[rows]).reshape(len(rows), -1).all(axis=1)
    return ~same


def purify_rows(job: PurifyJob, rows: ImageSet, poisoned: np.ndarray, store: ArtifactStore,
                key: str) -> tuple[np.ndarray, PurifyStats]:
    """The images of ``rows`` (sorted by id) purified, in the same order: at most one batch
    (``pipeline.batch_size``, a poison set's poisons at 1%) in one Ray task with a purifier actor's resources
    (a Ray Data pipeline costs ~10 s to start, more than purifying 20 images), more through Ray Data, the rows
    travelling through two staging directories of the store (every worker reaches it), removed afterwards.
    Both give the in-process result (per-sample seeding; tested)."""
    if len(rows) <= job.pipeline.batch_size:
        start = time.perf_counter()
        images = task_result(submit_task(purify_in_task, job.pipeline.actor_resources(), job.defense, job.seed,
                                         rows, store.uri))
        return images, PurifyStats.of(len(rows), time.perf_counter() - start, 1)
    source, sink = store.begin(key), store.begin(key)
    try:
        store.stage_imageset(source, rows, poisoned_ids=rows.ids[poisoned])
        stats = purify_parquet(source.uri, sink.uri, job.defense, seed=job.seed, ray_cfg=job.pipeline,
                               store_uri=store.uri, select_ids=rows.ids if job.defense.rank_by_energy else None)
        purified, _ = read_imageset(sink.uri)
    finally:
        store.abort(source)
        store.abort(sink)
    if not np.array_equal(purified.ids, rows.ids):
        raise RuntimeError(f"{key}: purifying {len(rows)} rows gave back other ids")
    return purified.images, stats


def purify_in_task(defense_cfg: Any, seed: int, rows: ImageSet, store_uri: str) -> np.ndarray:
    """The body of :func:`purify_rows`' Ray task: ``rows`` through the data defense, in process, on the device
    Ray assigned (CUDA only with a GPU); (N, H, W, C) uint8 in ``rows``' order."""
    from puregen_dist.defenses import build_defense
    from puregen_dist.generative.purifiers import purify_imageset

    load_plugins()
    cfg = with_device(resolve_models(defense_cfg, store_uri), ray_device(), only_auto=True)
    defense = build_defense(cfg)
    if cfg.rank_by_energy:  # the rows were selected already: purify every one (no ranking among them)
        return purify_imageset(defense.purifier, rows, seed=seed, batch_size=cfg.batch_size,
                               device=defense.device).images
    return defense.apply(rows, seed=seed).images


def rows_to_purify(job: PurifyJob, poison_key: str, store: ArtifactStore) -> int:
    """How many rows :func:`purify_stage` will purify for ``poison_key`` (for progress bars): all of them, or,
    when assembled from the clean set, its poisoned rows (footers and one column only)."""
    if clean_source(job) is None:
        return int(store.manifest(poison_key).get("rows", 0))
    return store.count_poisoned(poison_key)
