"""Generative-model references of the PureGen defenses (``defense.ebm`` / ``defense.ddpm``): a checkpoint
directory, or the key of a model artifact in the content-addressed store (``ebm-<hex16>`` / ``ddpm-<hex16>``,
what ``train-ebm --store`` prints).

Keys are resolved where the model is loaded (the driver for validation, each purifier actor for its own
copy), so a remote store works from any node: a local store hands out ``<root>/<key>`` itself, a remote one
downloads the files once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

from puregen_dist.config.errors import UserInputError
from puregen_dist.pipeline.store import KEY_RE, ArtifactStore, StoreError

MODEL_FIELDS = ("ebm", "ddpm")
"""Defense config fields that reference a generative model."""
WEIGHT_SUFFIXES = (".safetensors", ".json")


def is_artifact_key(ref: str) -> bool:
    """True when ``ref`` is shaped like an artifact key and is not an existing local path."""
    return bool(KEY_RE.fullmatch(ref)) and not Path(ref).exists()


def model_refs(defense_cfg: Any) -> dict[str, str]:
    """``{field: reference}`` of the model fields set on ``defense_cfg`` (empty for non-PureGen defenses)."""
    return {name: ref for name in MODEL_FIELDS if (ref := getattr(defense_cfg, name, None))}


def resolve_models(defense_cfg: Any, store: ArtifactStore | str | None) -> Any:
    """``defense_cfg`` with every model artifact key replaced by a local directory holding that model.

    Raises StoreError (exit 2) naming the field and key when no store is configured, the key is not in the
    store, or the artifact is not a model of that field's kind.
    """
    refs = model_refs(defense_cfg)
    resolved = {name: resolve_model_ref(ref, name, store, f"defense.{name}") for name, ref in refs.items()}
    return defense_cfg if resolved == refs else dataclasses.replace(defense_cfg, **resolved)


def resolve_model_ref(ref: str, kind: str, store: ArtifactStore | str | None, field: str) -> str:
    """A local directory for model reference ``ref`` of ``kind`` (a directory as it is, or an artifact key
    looked up in ``store``); ``field`` names the config key in errors."""
    if not is_artifact_key(ref):
        return ref
    if store is None:
        raise StoreError(f"{field}: {ref!r} is an artifact key, but this job has no artifact store to find it in")
    return _model_dir(store.uri if isinstance(store, ArtifactStore) else str(store), kind, ref, field)


@functools.lru_cache(maxsize=16)
def _model_dir(store_uri: str, kind: str, key: str, field: str) -> str:
    """Local directory of model artifact ``key`` (downloaded once per process from a remote store)."""
    store = ArtifactStore(store_uri)
    if not store.exists(key):
        raise StoreError(f"{field}: model artifact {key!r} not found in store {store.uri} "
                         f"(train it with `puregen-dist train-{kind} CONFIG --store {store.uri}`; "
                         "`puregen-dist artifacts ls` lists the store)")
    found = store.manifest(key).get("kind")
    if found != kind:
        raise StoreError(f"{field}: artifact {key!r} in store {store.uri} is a {found!r} artifact, "
                         f"expected a {kind!r} model")
    return str(store.get_dir(key))


def model_fingerprints(defense_cfg: Any) -> dict[str, str]:
    """What identifies each referenced model's weights, for the purified set's key: an artifact key as it is
    (content-addressed already), a directory as the SHA-256 of its checkpoint files (a path alone would serve a
    stale cache after retraining in place)."""
    return {name: ref if is_artifact_key(ref) else directory_digest(Path(ref))
            for name, ref in model_refs(defense_cfg).items()}


def directory_digest(directory: Path) -> str:
    """SHA-256 (16 hex digits) over the names and contents of the weight and config files under
    ``directory``; a missing directory is a UserInputError naming it."""
    if not directory.is_dir():
        raise UserInputError(f"{directory}: model checkpoint directory not found")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
