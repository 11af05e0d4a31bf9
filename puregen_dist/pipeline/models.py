"""Model references of configs (the fields declared with :func:`~puregen_dist.config.identity.model_ref`, e.g.
``defense.ebm``, ``defense.ddpm``, ``classifier.pretrained``): a checkpoint directory, or the key of a model
artifact in the content-addressed store (``<kind>-<hex16>``, what ``train-ebm --store`` prints).

Keys are resolved where the model is loaded (the driver for validation, each purifier actor for its own
copy), so a remote store works from any node: a local store hands out ``<root>/<key>`` itself, a remote one
downloads the files once per process.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.identity import file_refs, iter_model_refs, replace_model_refs
from puregen_dist.pipeline.store import KEY_RE, ArtifactStore, StoreError

WEIGHT_SUFFIXES = (".safetensors", ".json", ".parquet")


def is_artifact_key(ref: str) -> bool:
    """True when ``ref`` is shaped like an artifact key and is not an existing local path."""
    return bool(KEY_RE.fullmatch(ref)) and not Path(ref).exists()


def resolve_models(cfg: Any, store: ArtifactStore | str | None, section: str = "defense") -> Any:
    """``cfg`` with every model artifact key (in any field declared as a model reference, nested sections
    included) replaced by a local directory holding that model; ``section`` prefixes field names in errors.

    Raises StoreError (exit 2) naming the field and key when no store is configured, the key is not in the
    store, or the artifact is not a model of that field's kind.
    """
    return replace_model_refs(cfg, lambda path, kind, ref: resolve_model_ref(ref, kind, store,
                                                                              f"{section}.{path}"))


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


def model_fingerprints(cfg: Any) -> dict[str, str]:
    """``{dotted field: fingerprint}`` of each model ``cfg`` references, for the content key of what it
    computes: an artifact key as it is (content-addressed already), a directory as the SHA-256 of its
    checkpoint files (a path alone would serve a stale cache after retraining in place)."""
    return {path: ref if is_artifact_key(ref) else directory_digest(Path(ref))
            for path, _, ref in iter_model_refs(cfg)}


def directory_digest(directory: Path) -> str:
    """SHA-256 (16 hex digits) over the names and contents of the weight, config and Parquet files under
    ``directory`` (a checkpoint, or a poison set's directory given as ``train_on``); a missing directory is a
    UserInputError naming it."""
    if not directory.is_dir():
        raise UserInputError(f"{directory}: model checkpoint directory not found")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def file_fingerprints(cfg: Any, section: str = "attack") -> dict[str, str]:
    """``{field: fingerprint}`` of each input file or directory ``cfg`` declares with
    :func:`~puregen_dist.config.identity.file_ref` (imported poisons): the SHA-256 (16 hex digits) of the
    names and contents of its files (of a directory: the declared members, else every file under it), so a
    file replaced in place gets a new content key. A missing path is a UserInputError naming
    ``section.field``."""
    out = {}
    for name, (ref, members) in file_refs(cfg).items():
        root = Path(ref).expanduser()
        if not root.exists():
            raise UserInputError(f"{section}.{name}: not found: {ref}")
        if root.is_file():
            files = [root]
        elif members:
            files = [root / m for m in members if (root / m).is_file()]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(root) if path != root else ''}\0".encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        out[name] = digest.hexdigest()[:16]
    return out
