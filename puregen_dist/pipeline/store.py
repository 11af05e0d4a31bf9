"""Content-addressed artifact store (DESIGN §2): each DAG node is a directory named by its config's hash.

Keys: ``artifact_key(kind, config, inputs)`` is ``f"{kind}-{hex16}"``, where ``hex16`` is the first 16 hex
digits of the SHA-256 of the canonical JSON of ``{"kind": kind, "config": config, "inputs": [input keys]}``
(see :func:`canonical_json`). Nothing version-dependent enters the key; the package version is recorded in the
manifest instead, so a patch release keeps every cached artifact.

Layout under the store root (a local directory, an NFS path or any ``pyarrow.fs`` URI)::

    <root>/<key>/                 payload files (images.parquet, or model.safetensors + config.json, ...)
    <root>/<key>/manifest.json    written last: a key EXISTS iff its manifest exists (the commit point)
    <root>/.tmp/<key>-<hex>/      staging directories of writes in progress (or of crashed writes)
    <root>/.corrupt/<key>-<hex>/  artifacts that failed their checksums, moved aside (``gc`` removes them)

A write stages its files under ``.tmp``, moves the staging directory to ``<root>/<key>/`` with ``fs.move``
(an atomic rename on local disks and NFS; object stores without directory rename fall back to per-file
copies), then writes the manifest under a temporary name and moves it into place. A crash at any point before
the manifest lands leaves no readable artifact: readers only trust keys with a manifest, the next write of the
key replaces the incomplete directory, and :meth:`ArtifactStore.gc` removes the leftovers. One writer per key
at a time is assumed (the sweep planner materialises each key once); a writer that finds the key already
committed keeps the existing artifact and discards its own copy.

Integrity: the manifest records each file's size and SHA-256. Reads verify them (``get_imageset``, ``get_dir``,
``read_bytes``; a remote download hashes while it streams) and :meth:`ArtifactStore.reusable` -- what builders and
the sweep planner ask before skipping a build -- verifies a cached artifact before it is reused. A file that does not
match is never used: its artifact is moved to ``.corrupt/`` (uncommitted), with a warning naming the key and the
file, and the next request rebuilds it (a read raises :class:`CorruptArtifactError`, which says so).

A write that runs out of space (no space left on the device, a quota, a file-size limit) raises
:class:`StoreSpaceError` naming the file; the staging directory is removed, so nothing is left under the key.

This module may import pyarrow, never ray or mlflow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import puregen_dist
from puregen_dist.config.errors import UserInputError
from puregen_dist.data.io import imageset_table, read_imageset
from puregen_dist.types import ImageSet

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGESET_FILE = "images.parquet"
ROWS_PER_FILE = 4096
"""Rows per Parquet file of a stored image set (Ray Data reads one file per task)."""
ROWS_PER_GROUP = 1024
TMP_DIR = ".tmp"
CORRUPT_DIR = ".corrupt"
NOT_COMMITTED = "not committed"
STORE_FORMAT = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # artifact kinds
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*-[0-9a-f]{16}")  # what artifact_key returns
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 8 << 20
_BUILD_RESULT_KEYS = frozenset({"rows", "timings", "stats"})


class StoreError(UserInputError):
    """A missing, incomplete or corrupt artifact, or an unusable store URI (exit code 2 in the CLI)."""


class CorruptArtifactError(StoreError):
    """A committed artifact's file is missing or does not match its manifest's size and SHA-256. The artifact
    was moved aside (``<root>/.corrupt/``) and not used; the next request for the key rebuilds it."""


class StoreSpaceError(StoreError):
    """A write into the store failed for lack of space (ENOSPC, EDQUOT) or a file-size limit (EFBIG); the
    partial files were removed and nothing was stored under the key."""


_SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large (a file-size limit such as `ulimit -f`, or the filesystem's maximum)"}
_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def space_problem(exc: BaseException) -> str | None:
    """What ran out when ``exc`` (or an exception it was raised from, or wraps: a Ray task error's ``cause``)
    is a write failing for lack of space or a file-size limit, e.g. ``"no space left on device"``; else None.
    Exceptions that only carry the text (a remote worker's, re-raised by Ray) are recognised by it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _SPACE_ERRNOS:
            return _SPACE_ERRNOS[current.errno]
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    text = str(exc)
    for code, needle in zip(_SPACE_ERRNOS, _SPACE_TEXTS, strict=True):
        if needle in text:
            return _SPACE_ERRNOS[code]
    return None


# ----------------------------------------------------------------------------------------------- keys


def _canonical(obj: Any) -> Any:
    """``obj`` as plain JSON types: mappings with str keys, lists, str, int, float, bool, None.

    Tuples become lists, numpy scalars/arrays their Python values, dataclasses dicts, enums their values,
    paths strings, sets sorted lists. Anything else is a TypeError (it would not hash stably).
    """
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"artifact configs need str mapping keys, got {bad[:3]!r}")
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.generic):
        return _canonical(obj.item())
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    raise TypeError(f"cannot hash a {type(obj).__name__} in an artifact config: {obj!r:.80}")


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``, the input of :func:`artifact_key`.

    Rules: values normalised by ``_canonical`` (tuples -> lists, numpy -> Python, dataclasses -> dicts);
    object keys sorted; no whitespace (``separators=(",", ":")``); ASCII only (``\\uXXXX`` escapes); floats
    written by ``float.__repr__`` (shortest round-trip form, so ``0.1`` -> ``0.1``; ``1`` and ``1.0`` differ,
    the typed config layer fixes each field's type); non-finite floats as ``NaN``/``Infinity``. List order is
    kept: lists are semantically ordered.
    """
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)


def artifact_key(kind: str, config: Mapping[str, Any], inputs: Sequence[str] = ()) -> str:
    """``f"{kind}-{hex16}"``: hex16 = sha256(canonical_json({"kind", "config", "inputs"}))[:16].

    ``inputs`` (the keys of upstream artifacts) keep their given order; the caller orders them meaningfully
    (e.g. ``[poison_key, model_key]``). ``kind`` must match ``[A-Za-z0-9][A-Za-z0-9_.-]*``.
    """
    if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
        raise ValueError(f"artifact kind must match {NAME_RE.pattern}, got {kind!r}")
    if isinstance(inputs, str) or not all(isinstance(k, str) for k in inputs):
        raise TypeError(f"artifact inputs must be a sequence of artifact keys (str), got {inputs!r}")
    text = canonical_json({"kind": kind, "config": config, "inputs": list(inputs)})
    return f"{kind}-{hashlib.sha256(text.encode('ascii')).hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------- staging


@dataclass(frozen=True, eq=False)
class StagedArtifact:
    """A write in progress: files go under ``path`` (inside ``store.fs``), then :meth:`ArtifactStore.commit`.

    Attributes:
        key: the artifact key being written.
        path: the staging directory inside the store's filesystem (pass with ``filesystem=store.fs``).
        uri: the same directory as a full URI (a plain absolute path for local stores).
        checksums: ``{relative name: {"bytes", "sha256"}}`` of files the store wrote itself (filled by
            ``stage_*``); files written by others are hashed at commit.
    """

    key: str
    path: str
    uri: str
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)


class _HashingWriter(io.RawIOBase):
    """A write-only file object that forwards to ``out`` and keeps a running sha256 and byte count."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out, self.sha, self.bytes = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.out.write(view)
        self.bytes += len(view)
        return len(view)

    def digest(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha.hexdigest()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------------------------- store


class ArtifactStore:
    """Artifacts under a root directory of a ``pyarrow.fs`` filesystem (see the module docstring).

    Args:
        uri: a local path (relative paths are made absolute), ``file://``, ``s3://``, ``gs://``, ``hdfs://``
            or any other URI ``pyarrow.fs.FileSystem.from_uri`` understands.
        filesystem: an already configured filesystem (custom S3 endpoint, credentials, ...); ``uri`` is then
            the root path inside it.
        create: create the root directory when it is absent (False: readers such as a dry run see an empty
            store and leave nothing behind).

    Raises:
        StoreError: the URI is invalid or unreachable, or names a file (the message names the URI).
    """

    def __init__(self, uri: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None,
                 create: bool = True) -> None:
        uri = os.fspath(uri)
        if filesystem is None and not _SCHEME_RE.match(uri):
            uri = os.path.abspath(os.path.expanduser(uri))
        self.uri = uri
        self._scheme = uri.split("://", 1)[0] if _SCHEME_RE.match(uri) else None
        try:
            self.fs, root = (filesystem, uri) if filesystem is not None else pafs.FileSystem.from_uri(uri)
            self.root = root.rstrip("/") or "/"
            self._ensure_root(create)
        except StoreError:
            raise
        except (OSError, ValueError, NotImplementedError) as exc:
            raise StoreError(f"artifact store {uri!r} is not usable: {exc}") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def _ensure_root(self, create: bool) -> None:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            if create:
                self.fs.create_dir(self.root, recursive=True)
        elif info.type != pafs.FileType.Directory:
            raise StoreError(f"artifact store {self.uri!r} is not usable: {self.root} is a file, "
                             "not a directory")

    # ------------------------------------------------------------------------------------------- paths

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _uri_of(self, path: str) -> str:
        return f"{self._scheme}://{path}" if self._scheme and not self.local else path

    def _check_key(self, key: str) -> str:
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise StoreError(f"invalid artifact key {key!r}: keys match {KEY_RE.pattern}")
        return key

    def _expect_key(self, key: str, kind: str, config: Mapping[str, Any], inputs: Sequence[str]) -> None:
        expected = artifact_key(kind, config, inputs)
        if key != expected:
            raise ValueError(f"artifact key {key!r} does not match artifact_key(kind, config, inputs) "
                             f"= {expected!r}")

    def _type(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def _missing(self, key: str) -> StoreError:
        hint = ""
        if self._type(self._p(key)) == pafs.FileType.Directory:
            hint = (" (an incomplete write without a manifest was found: the next request rebuilds it, "
                    "`puregen-dist artifacts gc` removes it)")
        return StoreError(f"artifact {key!r} not found in store {self.uri}{hint}")

    # ------------------------------------------------------------------------------------------- queries

    def exists(self, key: str) -> bool:
        """True iff ``key`` is committed (its ``manifest.json`` exists)."""
        return self._type(self._p(self._check_key(key), MANIFEST)) == pafs.FileType.File

    def check(self, key: str, *, deep: bool | None = None) -> str | None:
        """None when ``key`` is committed and every file its manifest lists is there with the recorded size and
        (``deep``) SHA-256; else what is wrong: :data:`NOT_COMMITTED`, a corrupt manifest, a missing or corrupt
        file. ``deep`` defaults to hashing on local stores and to sizes only on remote ones (where hashing
        would download everything; their reads verify while they download)."""
        if not self.exists(key):
            return NOT_COMMITTED
        try:
            manifest = self.manifest(key)
        except StoreError as exc:
            return str(exc)
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return f"its manifest {self._uri_of(self._p(key, MANIFEST))} lists no files"
        deep = self.local if deep is None else deep
        for name, expected in sorted(files.items()):
            path = self._p(key, name)
            if deep:
                try:
                    got = self._hash_file(path)
                except FileNotFoundError:
                    return f"file {name} is missing"
                problem = _digest_problem(name, got, expected)
            else:
                info = self.fs.get_file_info(path)
                if info.type != pafs.FileType.File:
                    return f"file {name} is missing"
                problem = _digest_problem(name, {"bytes": info.size, "sha256": None}, expected)
            if problem:
                return problem
        return None

    def intact(self, key: str) -> bool:
        """True iff ``key`` is committed and passes :meth:`check` (a corrupt one is logged, left in place)."""
        problem = self.check(key)
        if problem not in (None, NOT_COMMITTED):
            log.warning("artifact %s in store %s is corrupt: %s (it is rebuilt when next needed)", key, self.uri,
                        problem)
        return problem is None

    def reusable(self, key: str) -> bool:
        """True iff ``key`` is committed and intact (:meth:`check`), so a builder may skip building it. A corrupt
        artifact is moved aside (:meth:`quarantine`) and False returned: the caller rebuilds it."""
        problem = self.check(key)
        if problem is None:
            return True
        if problem != NOT_COMMITTED:
            self.quarantine(key, problem)
        return False

    def quarantine(self, key: str, reason: str) -> str | None:
        """Move the corrupt artifact ``key`` to ``<root>/.corrupt/<key>-<hex>`` (uncommitting it: the manifest
        goes with it, first on stores that copy) with a warning naming ``reason``; returns where it went (None
        when another process moved or removed it first). ``gc`` removes quarantined artifacts."""
        src, dest = self._p(self._check_key(key)), self._p(CORRUPT_DIR, f"{key}-{uuid.uuid4().hex[:12]}")
        try:
            self.fs.create_dir(self._p(CORRUPT_DIR), recursive=True)
            if not self.local:  # per-file copies: uncommit before anything else
                with suppress(FileNotFoundError):
                    self.fs.delete_file(self._p(key, MANIFEST))
            self._move_dir(src, dest)
        except FileNotFoundError:
            return None
        except OSError as exc:  # at least uncommit it, so it is rebuilt rather than used
            log.warning("could not move corrupt artifact %s aside (%s); removing its manifest", key, exc)
            with suppress(OSError):
                self.fs.delete_file(self._p(key, MANIFEST))
            return None
        log.warning("artifact %s in store %s is corrupt (%s): not used, moved to %s; it is rebuilt when next "
                    "needed", key, self.uri, reason, self._uri_of(dest))
        return self._uri_of(dest)

    def manifest(self, key: str) -> dict[str, Any]:
        """The manifest of ``key``; StoreError naming the key when it is missing or unreadable."""
        path = self._p(self._check_key(key), MANIFEST)
        if self._type(path) != pafs.FileType.File:
            raise self._missing(key)
        with self.fs.open_input_stream(path) as f:
            text = f.read()
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"artifact {key!r} in store {self.uri}: corrupt manifest {path} ({exc})"
            raise StoreError(msg) from None

    def ls(self) -> list[dict[str, Any]]:
        """Manifests of all committed artifacts, oldest first (sorted by (created, key))."""
        manifests = []
        for key in self._key_dirs():
            if not self.exists(key):
                continue
            try:
                manifests.append(self.manifest(key))
            except StoreError as exc:
                log.warning("skipping %s", exc)
        return sorted(manifests, key=lambda m: (str(m.get("created", "")), str(m.get("key", ""))))

    def _key_dirs(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.Directory and KEY_RE.fullmatch(i.base_name))

    def imageset_path(self, key: str, *, uri: bool = True, verify: bool = False) -> str:
        """Where the Parquet data of image set ``key`` lives, for Ray Data to read.

        The single ``.parquet`` file of the artifact, or the artifact directory when it holds several (e.g.
        as written by Ray's ``write_parquet``; readers must then only take ``*.parquet``). ``uri=True`` gives
        a full URI (a plain path for local stores); ``uri=False`` the path inside ``store.fs``. ``verify=True``
        first checks the files' SHA-256 (:class:`CorruptArtifactError` when one differs): Ray Data reads the
        files itself, unverified.
        """
        manifest = self.manifest(key)
        names = self._parquet_files(key, manifest)
        if verify:
            for name, expected in sorted(manifest["files"].items()):
                self._verify_present(key, name, expected)
        path = self._p(key, names[0]) if len(names) == 1 else self._p(key)
        return self._uri_of(path) if uri else path

    def _parquet_files(self, key: str, manifest: Mapping[str, Any]) -> list[str]:
        names = sorted(n for n in manifest.get("files", {}) if n.endswith(".parquet"))
        if not names:
            raise StoreError(f"artifact {key!r} ({manifest.get('kind')}) in store {self.uri} holds no "
                             f"Parquet image set (files: {sorted(manifest.get('files', {}))})")
        return names

    # ------------------------------------------------------------------------------------------- writing

    def begin(self, key: str) -> StagedArtifact:
        """A fresh staging directory ``<root>/.tmp/<key>-<hex>/`` for a write of ``key``."""
        path = self._p(TMP_DIR, f"{self._check_key(key)}-{uuid.uuid4().hex[:12]}")
        with self._writing(key, path):
            self.fs.create_dir(path, recursive=True)
        return StagedArtifact(key=key, path=path, uri=self._uri_of(path))

    @contextmanager
    def _writing(self, key: str, path: str) -> Iterator[None]:
        """Turn a write failing for lack of space inside the block into :class:`StoreSpaceError` naming ``path``
        (the callers remove the staging directory)."""
        try:
            yield
        except StoreSpaceError:
            raise
        except Exception as exc:
            problem = space_problem(exc)
            if problem is None:
                raise
            raise self._space_error(key, path, problem) from exc

    def _space_error(self, key: str, path: str, problem: str) -> StoreSpaceError:
        return StoreSpaceError(f"artifact {key!r}: writing {self._uri_of(path)} failed: {problem}. Nothing was "
                               f"stored under the key (the partial files were removed); free space in {self.uri} "
                               "(or raise the quota or file-size limit) and run the command again")

    def _fail_write(self, staged: StagedArtifact, exc: BaseException) -> None:
        """After a failed write of ``staged``: remove the staging directory, and raise :class:`StoreSpaceError`
        instead of ``exc`` when it was for lack of space (else return: the caller re-raises ``exc``)."""
        self.abort(staged)
        if isinstance(exc, StoreSpaceError) or not isinstance(exc, Exception):
            return
        problem = space_problem(exc)
        if problem is not None:
            raise self._space_error(staged.key, staged.path, problem) from exc

    def abort(self, staged: StagedArtifact) -> None:
        """Remove a staging directory (best effort; :meth:`gc` catches what this misses)."""
        self._discard(staged.path)

    def _discard(self, path: str) -> None:
        try:
            if self._type(path) != pafs.FileType.NotFound:
                self.fs.delete_dir(path)
        except OSError as exc:
            log.warning("could not remove %s (gc will): %s", self._uri_of(path), exc)

    def stage_imageset(self, staged: StagedArtifact, data: ImageSet,
                       poisoned_ids: np.ndarray | None = None) -> int:
        """Write ``data`` (data/io schema, zstd) into ``staged``; returns N rows.

        Up to ``ROWS_PER_FILE`` rows go into ``images.parquet``; larger sets into ``images-00000.parquet``,
        ``images-00001.parquet``, ... of ``ROWS_PER_FILE`` rows each, in row groups of ``ROWS_PER_GROUP``:
        Ray Data reads a file per task, so bounded files keep every reader's memory bounded as N grows.
        """
        table = imageset_table(data, poisoned_ids)
        starts = range(0, max(len(data), 1), ROWS_PER_FILE)
        for index, start in enumerate(starts):
            name = IMAGESET_FILE if len(starts) == 1 else f"images-{index:05d}.parquet"
            path = f"{staged.path}/{name}"
            with self._writing(staged.key, path), self.fs.open_output_stream(path) as out:
                writer = _HashingWriter(out)
                pq.write_table(table.slice(start, ROWS_PER_FILE), writer, compression="zstd",
                               row_group_size=ROWS_PER_GROUP)
            staged.checksums[name] = writer.digest()
        return len(data)

    def stage_bytes(self, staged: StagedArtifact, name: str, payload: bytes) -> None:
        """Write ``payload`` as file ``name`` (no subdirectories) into ``staged``."""
        if "/" in name or name == MANIFEST:
            raise ValueError(f"invalid artifact file name {name!r}")
        path = f"{staged.path}/{name}"
        with self._writing(staged.key, path), self.fs.open_output_stream(path) as out:
            writer = _HashingWriter(out)
            writer.write(payload)
        staged.checksums[name] = writer.digest()

    def read_bytes(self, key: str, name: str) -> bytes:
        """The content of file ``name`` of the committed artifact ``key``, checked against its manifest's size
        and SHA-256 (:class:`CorruptArtifactError` when it differs or is missing)."""
        expected = self.manifest(key).get("files", {}).get(name)
        if expected is None:
            raise StoreError(f"artifact {key!r} in store {self.uri} has no file {name!r}")
        try:
            with self.fs.open_input_stream(self._p(key, name)) as src:
                payload = src.read()
        except FileNotFoundError:
            raise self._corrupt(key, f"file {name} is missing") from None
        got = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        self._check_digest(key, name, got, expected)
        return payload

    def stage_dir(self, staged: StagedArtifact, local_dir: str | os.PathLike[str]) -> int:
        """Copy every file under the local directory ``local_dir`` into ``staged``; returns the file count."""
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"{src}: not a directory, cannot store it as artifact {staged.key!r}")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        for file in files:
            rel = file.relative_to(src).as_posix()
            if rel == MANIFEST:
                raise StoreError(f"{file}: {MANIFEST!r} is reserved for the store's manifest")
            dest = f"{staged.path}/{rel}"
            with self._writing(staged.key, dest):
                if "/" in rel:
                    self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                with open(file, "rb") as f, self.fs.open_output_stream(dest) as out:
                    writer = _HashingWriter(out)
                    shutil.copyfileobj(f, writer, _CHUNK)
            staged.checksums[rel] = writer.digest()
        return len(files)

    def commit(self, staged: StagedArtifact, *, kind: str, config: Mapping[str, Any],
               inputs: Sequence[str] = (), rows: int | None = None,
               timings: Mapping[str, float] | None = None,
               stats: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Publish the files in ``staged`` as artifact ``staged.key``; returns its manifest.

        ``staged.key`` must equal ``artifact_key(kind, config, inputs)`` (ValueError otherwise). Files not
        written by ``stage_*`` are hashed here. If the key was committed meanwhile, the staged copy is
        discarded and the existing manifest returned. On any error the staging directory is removed.
        """
        try:
            self._expect_key(staged.key, kind, config, inputs)
            files = self._checksums(staged)
            manifest = self._new_manifest(staged.key, kind, config, inputs, rows, timings, files, stats)
            return self._publish(staged, manifest)
        except Exception as exc:
            self._fail_write(staged, exc)
            raise

    def _checksums(self, staged: StagedArtifact) -> dict[str, dict[str, Any]]:
        infos = self.fs.get_file_info(pafs.FileSelector(staged.path, recursive=True))
        files = {}
        for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
            rel = info.path[len(staged.path.rstrip("/")) + 1:]
            if rel == MANIFEST:
                raise StoreError(f"{staged.uri}: a staged file is named {MANIFEST!r}, which is reserved")
            known = staged.checksums.get(rel)
            files[rel] = known if known and known["bytes"] == info.size else self._hash_file(info.path)
        if not files:
            raise StoreError(f"{staged.uri}: nothing was written for artifact {staged.key!r} "
                             "(empty staging dir)")
        return files

    def _hash_file(self, path: str) -> dict[str, Any]:
        sha, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha.update(chunk)
                size += len(chunk)
        return {"bytes": size, "sha256": sha.hexdigest()}

    def _new_manifest(self, key: str, kind: str, config: Mapping[str, Any], inputs: Sequence[str],
                      rows: int | None, timings: Mapping[str, float] | None,
                      files: dict[str, dict[str, Any]], stats: Mapping[str, float] | None = None
                      ) -> dict[str, Any]:
        manifest = {"key": key, "kind": kind, "config": json.loads(canonical_json(config)),
                    "inputs": list(inputs), "version": puregen_dist.__version__, "store_format": STORE_FORMAT,
                    "created": _now(),
                    "timings": {k: float(v) for k, v in (timings or {}).items()},
                    "rows": None if rows is None else int(rows), "files": files}
        if stats:  # what the build measured about its result (e.g. a poison set's crafting losses)
            manifest["stats"] = {k: float(v) for k, v in stats.items()}
        return manifest

    def _publish(self, staged: StagedArtifact, manifest: dict[str, Any]) -> dict[str, Any]:
        key, dest = staged.key, self._p(staged.key)
        if self.exists(key) and self.check(key) is None:
            log.info("artifact %s was committed meanwhile; discarding this copy", key)
            self.abort(staged)
            return self.manifest(key)
        if self.exists(key):  # committed but corrupt: set aside, replaced by this copy
            self.quarantine(key, self.check(key) or "corrupt")
        if self._type(dest) != pafs.FileType.NotFound:
            log.warning("replacing incomplete artifact dir %s (no manifest: a crashed write)",
                        self._uri_of(dest))
            self.fs.delete_dir(dest)
        self._move_dir(staged.path, dest)
        try:
            self._write_manifest(key, manifest)
        except Exception:
            self._discard(dest)
            raise
        log.info("committed artifact %s (%d files, %d bytes)", key, len(manifest["files"]),
                 sum(f["bytes"] for f in manifest["files"].values()))
        return manifest

    def _move_dir(self, src: str, dest: str) -> None:
        """Rename ``src`` to ``dest``; per-file copies on object stores that cannot rename directories."""
        try:
            self.fs.move(src, dest)
            return
        except (NotImplementedError, OSError):
            if self.local:
                raise
        log.debug("directory move unsupported on %s; copying files", self.fs.type_name)
        infos = self.fs.get_file_info(pafs.FileSelector(src, recursive=True))
        for info in (i for i in infos if i.type == pafs.FileType.File):
            target = dest + info.path[len(src.rstrip("/")):]
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(info.path, target)
        self.fs.delete_dir(src)

    def _write_manifest(self, key: str, manifest: Mapping[str, Any]) -> None:
        """Write the manifest under a temporary name, then move it into place: the commit point."""
        tmp = self._p(TMP_DIR, f"{key}-{uuid.uuid4().hex[:12]}.{MANIFEST}")
        try:
            with self._writing(key, tmp), self.fs.open_output_stream(tmp) as out:
                out.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
            self.fs.move(tmp, self._p(key, MANIFEST))
        except BaseException:
            with suppress(OSError):
                self.fs.delete_file(tmp)
            raise

    # ------------------------------------------------------------------------------------------- put / get

    def put_imageset(self, key: str, data: ImageSet, *, kind: str, config: Mapping[str, Any],
                     inputs: Sequence[str] = (), poisoned_ids: np.ndarray | None = None,
                     timings: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Store ``data`` (N images) as Parquet (see :meth:`stage_imageset`); returns the manifest (the
        existing one if ``key`` is already committed: content-addressed, so the same content)."""
        self._expect_key(key, kind, config, inputs)
        if self.reusable(key):
            return self.manifest(key)
        staged = self.begin(key)
        try:
            rows = self.stage_imageset(staged, data, poisoned_ids)
        except Exception as exc:
            self._fail_write(staged, exc)
            raise
        return self.commit(staged, kind=kind, config=config, inputs=inputs, rows=rows, timings=timings)

    def get_imageset(self, key: str, *, verify: bool = True) -> tuple[ImageSet, np.ndarray]:
        """(ImageSet, poisoned flags (N,) bool) of image set ``key``, sorted by id (Ray Data writes blocks in
        completion order, across files and within one file), read through ``store.fs`` by
        :func:`~puregen_dist.data.io.read_imageset`. ``verify`` (default) first checks every file's sha256
        against the manifest (:class:`CorruptArtifactError` when one differs; on a remote store that reads the
        files twice)."""
        manifest = self.manifest(key)
        names = self._parquet_files(key, manifest)
        if verify:
            for name in names:
                self._verify_present(key, name, manifest["files"][name])
        try:
            return read_imageset([self._p(key, name) for name in names], filesystem=self.fs)
        except UserInputError as exc:
            raise StoreError(f"artifact {key!r} in store {self.uri}: {exc}") from None

    def count_poisoned(self, key: str) -> int:
        """How many rows of image set ``key`` are flagged poisoned (reads that one column only)."""
        names = self._parquet_files(key, self.manifest(key))
        table = pq.read_table([self._p(key, name) for name in names], columns=["poisoned"], filesystem=self.fs)
        return int(pc.sum(table.column("poisoned")).as_py() or 0)

    def _verify_present(self, key: str, name: str, expected: Mapping[str, Any]) -> None:
        try:
            self._verify(key, name, expected)
        except FileNotFoundError:
            raise self._corrupt(key, f"file {name} is missing") from None

    def _verify(self, key: str, name: str, expected: Mapping[str, Any]) -> None:
        self._check_digest(key, name, self._hash_file(self._p(key, name)), expected)

    def _check_digest(self, key: str, name: str, got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
        problem = _digest_problem(name, got, expected)
        if problem:
            raise self._corrupt(key, problem)

    def _corrupt(self, key: str, problem: str) -> CorruptArtifactError:
        """Quarantine ``key`` (:meth:`quarantine`) and the error that says so."""
        where = self.quarantine(key, problem)
        moved = f"moved to {where}" if where else "no longer in the store"
        return CorruptArtifactError(f"artifact {key!r} in store {self.uri}: {problem}. It was not used ({moved}); "
                                    "the next `puregen-dist sweep` or stage command that needs it rebuilds it")

    def _download(self, key: str, name: str, local: Path, expected: Mapping[str, Any] | None) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_input_stream(self._p(key, name)) as src, open(local, "wb") as dst:
                writer = _HashingWriter(dst)
                shutil.copyfileobj(src, writer, _CHUNK)
        except FileNotFoundError:
            raise self._corrupt(key, f"file {name} is missing") from None
        if expected is not None:
            self._check_digest(key, name, writer.digest(), expected)

    def put_dir(self, key: str, local_dir: str | os.PathLike[str], *, kind: str, config: Mapping[str, Any],
                inputs: Sequence[str] = (), timings: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Store every file under ``local_dir`` (e.g. a model dir: model.safetensors + config.json); returns
        the manifest (the existing one if ``key`` is already committed)."""
        self._expect_key(key, kind, config, inputs)
        if self.reusable(key):
            return self.manifest(key)
        staged = self.begin(key)
        try:
            self.stage_dir(staged, local_dir)
        except Exception as exc:
            self._fail_write(staged, exc)
            raise
        return self.commit(staged, kind=kind, config=config, inputs=inputs, timings=timings)

    def get_dir(self, key: str, local_dir: str | os.PathLike[str] | None = None, *,
                verify: bool = True) -> Path:
        """A local directory holding the files of ``key``.

        Local stores return ``<root>/<key>`` itself (treat it as read-only; it also holds ``manifest.json``).
        Remote stores download the files into ``local_dir`` (a fresh temporary directory, owned by the caller,
        when None). ``verify`` (default) checks sha256 checksums (:class:`CorruptArtifactError` when one
        differs; a download hashes while it streams).
        """
        manifest = self.manifest(key)
        if self.local:
            if verify:
                for name, expected in sorted(manifest["files"].items()):
                    self._verify_present(key, name, expected)
            return Path(self._p(key))
        target = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix=f"{key}-"))
        for name, expected in sorted(manifest["files"].items()):
            self._download(key, name, target / name, expected if verify else None)
        return target

    def get_or_build(self, key: str, build: Callable[[StagedArtifact], Mapping[str, Any] | None], *,
                     kind: str, config: Mapping[str, Any],
                     inputs: Sequence[str] = ()) -> tuple[dict[str, Any], bool]:
        """(manifest, built): the committed artifact ``key``, building it first when missing.

        ``build(staged)`` writes the payload into ``staged.path`` (through ``store.fs``, or with
        ``store.stage_imageset`` / ``store.stage_dir``) and returns None or
        ``{"rows": int, "timings": {...}, "stats": {...}}`` (stats: numbers describing the result).
        The build time is recorded as ``timings["build_s"]``. A failing build leaves nothing behind (a build
        that ran out of space: :class:`StoreSpaceError`). A committed artifact that fails its checksums is moved
        aside and rebuilt (:meth:`reusable`).
        """
        self._expect_key(key, kind, config, inputs)
        if self.reusable(key):
            return self.manifest(key), False
        staged, start = self.begin(key), time.perf_counter()
        try:
            result = dict(build(staged) or {})
        except Exception as exc:
            self._fail_write(staged, exc)
            raise
        unknown = set(result) - _BUILD_RESULT_KEYS
        if unknown:
            self.abort(staged)
            raise ValueError(f"build for {key!r} returned unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(_BUILD_RESULT_KEYS)}")
        timings = {"build_s": time.perf_counter() - start, **result.get("timings", {})}
        manifest = self.commit(staged, kind=kind, config=config, inputs=inputs, rows=result.get("rows"),
                               timings=timings, stats=result.get("stats"))
        return manifest, True

    # ------------------------------------------------------------------------------------------- removal

    def rm(self, key: str) -> None:
        """Remove artifact ``key`` (manifest first, so readers never see a half-removed artifact)."""
        dest = self._p(self._check_key(key))
        if self._type(dest) == pafs.FileType.NotFound:
            raise StoreError(f"artifact {key!r} not found in store {self.uri}")
        if self.exists(key):
            self.fs.delete_file(self._p(key, MANIFEST))
        self.fs.delete_dir(dest)
        log.info("removed artifact %s", key)

    def gc(self, older_than_s: float = 0.0) -> list[str]:
        """Remove staging leftovers (``.tmp/*``), quarantined corrupt artifacts (``.corrupt/*``) and key
        directories without a manifest; returns their names relative to the root. Entries younger than ``older_than_s`` seconds (by mtime) are kept, so a
        gc with a margin is safe next to running writers; the default 0 assumes no writer is active."""
        removed = []
        for name in self._gc_candidates():
            path = self._p(name)
            if older_than_s > 0 and self._age_s(path) < older_than_s:
                continue
            if self._type(path) == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            else:
                self.fs.delete_file(path)
            removed.append(name)
        if removed:
            log.info("gc removed %d leftover(s) from %s", len(removed), self.uri)
        return removed

    def _gc_candidates(self) -> Iterator[str]:
        for special in (TMP_DIR, CORRUPT_DIR):
            tmp = self._p(special)
            if self._type(tmp) == pafs.FileType.Directory:
                for info in self.fs.get_file_info(pafs.FileSelector(tmp, recursive=False)):
                    yield f"{special}/{info.base_name}"
        for key in self._key_dirs():
            if not self.exists(key):
                yield key

    def _age_s(self, path: str) -> float:
        """Seconds since the newest mtime at or under ``path``; 0 (too young to remove) when unknown."""
        infos = [self.fs.get_file_info(path)]
        if infos[0].type == pafs.FileType.Directory:
            infos += self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        stamps = [i.mtime.timestamp() for i in infos if i.mtime is not None]
        return time.time() - max(stamps) if stamps else 0.0


def _digest_problem(name: str, got: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """None when ``got`` matches ``expected`` (``{"bytes", "sha256"}``; a None sha256 in ``got`` checks the size
    only), else what differs, naming file ``name``."""
    if got["bytes"] != expected.get("bytes"):
        return f"file {name} has {got['bytes']} bytes, its manifest says {expected.get('bytes')}"
    if got["sha256"] is not None and got["sha256"] != expected.get("sha256"):
        return (f"file {name} is corrupt (sha256 {got['sha256'][:12]}..., its manifest says "
                f"{str(expected.get('sha256'))[:12]}...)")
    return None


def total_bytes(manifest: Mapping[str, Any]) -> int:
    """Sum of the payload file sizes recorded in ``manifest``."""
    return int(sum(f.get("bytes", 0) for f in manifest.get("files", {}).values()))


__all__ = ["ArtifactStore", "CorruptArtifactError", "StagedArtifact", "StoreError", "StoreSpaceError", "artifact_key",
           "canonical_json", "space_problem", "total_bytes", "MANIFEST", "IMAGESET_FILE"]
