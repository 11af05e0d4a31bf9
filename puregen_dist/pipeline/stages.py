"""Pipeline stages as cached artifacts (DESIGN §2): the poison set, then the purified set, each built once per
content key in the artifact store and skipped when it exists."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puregen_dist.config.generative import PurifyJob
from puregen_dist.config.loading import to_dict
from puregen_dist.pipeline.purify import ensure_ray, purify_parquet
from puregen_dist.pipeline.store import ArtifactStore, StagedArtifact, artifact_key

log = logging.getLogger(__name__)

EXECUTION_ONLY = ("batch_size", "device")
WEIGHT_SUFFIXES = (".safetensors", ".json")
"""Defense fields that change how, not what, is computed: left out of artifact keys."""


@dataclass
class StageResult:
    """A stage's artifact key, manifest, and whether this call built it (False: cache hit)."""

    key: str
    manifest: dict[str, Any]
    built: bool


def poison_stage(job: PurifyJob, prep: Any, store: ArtifactStore) -> StageResult:
    """The poisoned training set of (data, attack, seed), crafted in-process once per key."""
    config = {"data": to_dict(job.data), "attack": to_dict(job.attack), "seed": job.seed}
    key = artifact_key("poison", config)

    def build(staged: StagedArtifact) -> dict[str, Any]:
        poison = prep.attack.craft(prep.train, seed=job.seed)
        rows = store.stage_imageset(staged, poison.materialize(), poisoned_ids=poison.poison_ids)
        return {"rows": rows, "timings": {"craft_s": float(poison.meta.get("craft_seconds", 0.0))}}

    manifest, built = store.get_or_build(key, build, kind="poison", config=config)
    return StageResult(key, manifest, built)


def purify_stage(job: PurifyJob, poison_key: str, store: ArtifactStore) -> StageResult:
    """The purified set of (poison set, defense, seed) through Ray Data, once per key."""
    defense = {k: v for k, v in to_dict(job.defense).items() if k not in EXECUTION_ONLY}
    config = {"defense": defense, "seed": job.seed, "models": model_fingerprints(job.defense)}
    key = artifact_key("purified", config, inputs=[poison_key])

    def build(staged: StagedArtifact) -> dict[str, Any]:
        ensure_ray(job.pipeline.address)
        stats = purify_parquet(store.imageset_path(poison_key), staged.uri, job.defense, seed=job.seed,
                               ray_cfg=job.pipeline)
        return {"rows": stats.images, "timings": {"purify_s": stats.seconds,
                                                  "images_per_second": stats.images_per_second,
                                                  "seconds_per_image_per_device":
                                                      stats.seconds_per_image_per_device}}

    manifest, built = store.get_or_build(key, build, kind="purified", config=config, inputs=[poison_key])
    return StageResult(key, manifest, built)


def model_fingerprints(defense_cfg: Any) -> dict[str, str]:
    """SHA-256 of the checkpoint files each generative model reference points to, so that retraining a model
    in place changes the purified set's key (a path alone would serve a stale cache)."""
    return {name: directory_digest(Path(getattr(defense_cfg, name)))
            for name in ("ebm", "ddpm") if getattr(defense_cfg, name, None)}


def directory_digest(directory: Path) -> str:
    """SHA-256 over the names and contents of the weight and config files under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]

