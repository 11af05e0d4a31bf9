"""The artifact store: stable keys, atomic commits, crash recovery, gc, local and remote-like filesystems."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import make_imageset
from puregen_dist import __version__
from puregen_dist.config.errors import UserInputError
from puregen_dist.data.io import imageset_table
from puregen_dist.pipeline.artifacts_cli import format_table, human_bytes, show
from puregen_dist.pipeline.store import (
    MANIFEST,
    ArtifactStore,
    CorruptArtifactError,
    StagedArtifact,
    StoreError,
    StoreSpaceError,
    artifact_key,
    canonical_json,
)

CONFIG = {"defense": "ebm", "steps": 150, "step_size": 0.01, "seeds": (1, 2),
          "model": {"nf": 32, "act": "silu"}}
INPUTS = ("poison-0123456789abcdef", "ebm-fedcba9876543210")
GOLDEN = "purified-f59b80743d8045e5"


class Crash(BaseException):
    """Models a hard kill (SIGKILL, power loss): no `except Exception` cleanup runs after it."""


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def _key(config=CONFIG, inputs=INPUTS, kind="purified") -> str:
    return artifact_key(kind, config, inputs)


def _put(store: ArtifactStore, n: int = 12, seed: int = 0, **config) -> tuple[str, object, dict]:
    data = make_imageset(n=n, size=4, seed=seed)
    cfg = {**CONFIG, **config}
    key = _key(cfg)
    manifest = store.put_imageset(key, data, kind="purified", config=cfg, inputs=INPUTS,
                                  poisoned_ids=data.ids[[0, 3]], timings={"purify_s": 1.5})
    return key, data, manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ keys


def test_key_is_golden_and_ignores_mapping_order_and_container_types():
    assert _key() == GOLDEN
    reordered = {"model": {"act": "silu", "nf": 32}, "seeds": [1, 2], "step_size": 0.01,
                 "steps": np.int64(150), "defense": "ebm"}
    assert _key(reordered) == GOLDEN
    assert canonical_json({"b": 0.1, "a": (1, None)}) == '{"a":[1,null],"b":0.1}'


@pytest.mark.parametrize("change", [
    {"kind": "jpeg"}, {"inputs": INPUTS[::-1]}, {"inputs": INPUTS[:1]},
    {"config": {**CONFIG, "steps": 151}}, {"config": {**CONFIG, "step_size": 0.010000000000000002}},
    {"config": {**CONFIG, "model": {"nf": 32}}},
])
def test_kind_inputs_and_config_change_the_key(change):
    args = {"kind": "purified", "config": CONFIG, "inputs": INPUTS, **change}
    key = artifact_key(args["kind"], args["config"], args["inputs"])
    assert key != GOLDEN and key.startswith(f"{args['kind']}-") and len(key.split("-")[-1]) == 16


def test_bad_kinds_inputs_and_config_values_are_refused():
    with pytest.raises(ValueError, match="kind"):
        artifact_key("../evil", CONFIG)
    with pytest.raises(TypeError, match="sequence of artifact keys"):
        artifact_key("purified", CONFIG, "poison-0123")
    with pytest.raises(TypeError, match="cannot hash"):
        artifact_key("purified", {"f": object()})


# ------------------------------------------------------------------------------------------------ image sets


def test_imageset_roundtrip_records_manifest_and_checksums(store, tmp_path):
    key, data, manifest = _put(store)
    back, poisoned = store.get_imageset(key, verify=True)
    assert np.array_equal(back.images, data.images) and np.array_equal(back.ids, data.ids)
    assert np.array_equal(back.labels, data.labels) and back.classes == data.classes
    assert poisoned.tolist() == [i in (0, 3) for i in range(12)]
    assert manifest == store.manifest(key)
    assert manifest["key"] == key and manifest["kind"] == "purified" and manifest["rows"] == 12
    assert manifest["inputs"] == list(INPUTS) and manifest["version"] == __version__
    assert manifest["timings"] == {"purify_s": 1.5} and manifest["created"].endswith("+00:00")
    assert artifact_key(manifest["kind"], manifest["config"], manifest["inputs"]) == key
    path = tmp_path / "store" / key / "images.parquet"
    assert manifest["files"] == {"images.parquet": {"bytes": path.stat().st_size, "sha256": _sha256(path)}}
    assert store.imageset_path(key) == str(path)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".tmp", key]
    assert not list((tmp_path / "store" / ".tmp").iterdir())


def test_second_put_is_a_cache_hit(store):
    key, _, first = _put(store)
    assert store.put_imageset(key, make_imageset(n=3, size=4), kind="purified", config=CONFIG,
                              inputs=INPUTS) == first


def _flip(path: Path, offset: int = -20) -> None:
    """Flip one bit of ``path`` in place (same size: only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_file_is_detected_never_used_set_aside_and_rebuilt(store, tmp_path):
    key, data, manifest = _put(store)
    path = tmp_path / "store" / key / "images.parquet"
    _flip(path)
    assert store.exists(key) and "images.parquet is corrupt" in store.check(key)
    assert not store.intact(key) and store.exists(key)  # intact() only looks
    with pytest.raises(CorruptArtifactError, match=f"{key}.*images.parquet is corrupt.*not used.*rebuilds it"):
        store.get_imageset(key)  # verified by default
    assert not store.exists(key) and not path.exists()  # uncommitted: moved aside whole
    (aside,) = (tmp_path / "store" / ".corrupt").iterdir()
    assert aside.name.startswith(key) and (aside / MANIFEST).is_file()
    # the next request rebuilds it: the same bytes as before the corruption
    _, _, rebuilt = _put(store)
    assert rebuilt["files"] == manifest["files"] and store.check(key) is None
    assert np.array_equal(store.get_imageset(key)[0].images, data.images)
    assert store.gc() == [f".corrupt/{aside.name}"]


def test_reusable_sets_a_corrupt_artifact_aside_so_get_or_build_rebuilds_it(store, tmp_path):
    key, config = _key({"n": 1}, ()), {"n": 1}
    calls = []

    def build(staged):
        calls.append(1)
        store.stage_bytes(staged, "payload.bin", b"abc" * 100)

    store.get_or_build(key, build, kind="purified", config=config)
    _flip(tmp_path / "store" / key / "payload.bin")
    assert store.get_or_build(key, build, kind="purified", config=config)[1] is True and len(calls) == 2
    assert store.read_bytes(key, "payload.bin") == b"abc" * 100
    (tmp_path / "store" / key / "payload.bin").write_bytes(b"abc")  # truncated
    with pytest.raises(CorruptArtifactError, match="payload.bin has 3 bytes, its manifest says 300"):
        store.read_bytes(key, "payload.bin")
    assert not store.exists(key)


def test_a_corrupt_manifest_or_a_missing_file_is_not_reused(store, tmp_path):
    key, _, _ = _put(store)
    (tmp_path / "store" / key / MANIFEST).write_text("{not json")
    assert "corrupt manifest" in store.check(key) and not store.reusable(key) and not store.exists(key)
    key, _, _ = _put(store)
    (tmp_path / "store" / key / "images.parquet").unlink()
    assert store.check(key) == "file images.parquet is missing"
    with pytest.raises(CorruptArtifactError, match="file images.parquet is missing"):
        store.get_imageset(key)


def test_a_remote_store_checks_sizes_without_downloading(tmp_path):
    remote = ArtifactStore(str(tmp_path / "bucket"), filesystem=pafs.PyFileSystem(ObjectStoreLike()))
    key, _, _ = _put(remote)
    path = tmp_path / "bucket" / key / "images.parquet"
    _flip(path)
    assert remote.check(key) is None  # same size: only a download (a read) can tell
    assert "is corrupt" in remote.check(key, deep=True)
    with pytest.raises(CorruptArtifactError, match="images.parquet is corrupt"):
        remote.get_imageset(key)
    assert not remote.exists(key)
    key, _, _ = _put(remote)
    path.write_bytes(b"x")
    assert "has 1 bytes" in remote.check(key) and not remote.reusable(key) and not remote.exists(key)


def test_an_unreadable_file_is_a_store_error_naming_key_and_file(store, tmp_path):
    key, _, _ = _put(store)
    path = tmp_path / "store" / key / "images.parquet"
    path.write_bytes(b"garbage")
    with pytest.raises(StoreError, match=f"{key}.*images.parquet: not a readable Parquet file"):
        store.get_imageset(key, verify=False)
    path.unlink()
    with pytest.raises(StoreError, match=f"{key}.*images.parquet: Parquet image set not found"):
        store.get_imageset(key, verify=False)
    with pytest.raises(StoreError, match=f"{key}.*file images.parquet is missing"):
        store.get_imageset(key)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
@pytest.mark.parametrize("where", ["payload", "manifest"])
def test_a_full_disk_is_a_clear_error_and_leaves_nothing(store, tmp_path, monkeypatch, code, where):
    """A write failing with ENOSPC / EFBIG (the payload's or the manifest's): StoreSpaceError naming the file
    and the cause, no artifact under the key, no staging leftovers."""
    from puregen_dist.pipeline import store as store_module

    if where == "payload":
        def write(self, data):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(store_module._HashingWriter, "write", write)
    else:
        real_open = pafs.LocalFileSystem.open_output_stream

        def open_output_stream(fs, path, *args, **kwargs):
            if path.endswith(MANIFEST):
                raise OSError(code, f"Error writing bytes to file. Detail: [errno {code}] {os.strerror(code)}")
            return real_open(fs, path, *args, **kwargs)
        monkeypatch.setattr(store, "fs", _Patched(store.fs, open_output_stream))
    cause = "no space left on device" if code == errno.ENOSPC else "file too large"
    name = "images.parquet" if where == "payload" else MANIFEST
    with pytest.raises(StoreSpaceError, match=f"{_key()}.*: writing .*{name} failed: {cause}.*Nothing was stored"):
        _put(store)
    assert isinstance(StoreSpaceError("x"), UserInputError)  # exit code 2 in the CLI
    assert not store.exists(_key()) and store.ls() == []
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".tmp"]
    assert not list((tmp_path / "store" / ".tmp").iterdir())


class _Patched:
    """``fs`` with ``open_output_stream`` replaced (pyarrow's filesystem methods are read-only)."""

    def __init__(self, fs, open_output_stream):
        self._fs, self._open = fs, open_output_stream

    def open_output_stream(self, path, *args, **kwargs):
        return self._open(self._fs, path, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_space_problem_recognises_wrapped_and_textual_errors():
    from puregen_dist.pipeline.store import space_problem

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write task failed") from inner
    except RuntimeError as outer:
        assert space_problem(outer) == "no space left on device"
    remote = RuntimeError("ray.exceptions.RayTaskError: OSError: [Errno 122] Disk quota exceeded")
    assert space_problem(remote) == "disk quota exceeded"
    assert space_problem(OSError(errno.EACCES, "Permission denied")) is None


def test_commit_of_files_written_by_another_writer(store):
    data = make_imageset(n=10, size=4)
    key = _key()
    staged = store.begin(key)
    assert isinstance(staged, StagedArtifact) and staged.uri == staged.path and "/.tmp/" in staged.path
    # Ray Data finishes blocks in any order: here the file named first holds the later ids
    for part, rows in (("part-0.parquet", slice(5, 10)), ("part-1.parquet", slice(0, 5))):
        pq.write_table(imageset_table(data.take(np.arange(10)[rows])), f"{staged.path}/{part}",
                       filesystem=store.fs)
    manifest = store.commit(staged, kind="purified", config=CONFIG, inputs=INPUTS, rows=10)
    assert sorted(manifest["files"]) == ["part-0.parquet", "part-1.parquet"]
    back, _ = store.get_imageset(key, verify=True)
    assert np.array_equal(back.ids, data.ids) and np.array_equal(back.images, data.images)
    assert store.imageset_path(key) == str(Path(store.root) / key)


def test_large_image_sets_are_split_into_bounded_files(store, monkeypatch):
    import puregen_dist.pipeline.store as store_module

    monkeypatch.setattr(store_module, "ROWS_PER_FILE", 4)
    monkeypatch.setattr(store_module, "ROWS_PER_GROUP", 2)
    data = make_imageset(n=10, size=4)
    key = _key()
    manifest = store.put_imageset(key, data, kind="purified", config=CONFIG, inputs=INPUTS,
                                  poisoned_ids=data.ids[[1, 9]])
    names = ["images-00000.parquet", "images-00001.parquet", "images-00002.parquet"]
    assert sorted(manifest["files"]) == names and manifest["rows"] == 10
    assert [pq.ParquetFile(store.fs.open_input_file(f"{store.root}/{key}/{n}")).metadata.num_row_groups
            for n in names] == [2, 2, 1]
    assert store.imageset_path(key) == str(Path(store.root) / key)  # Ray Data reads the directory
    back, poisoned = store.get_imageset(key, verify=True)
    assert np.array_equal(back.images, data.images) and np.flatnonzero(poisoned).tolist() == [1, 9]


def test_one_file_with_blocks_out_of_order_is_returned_sorted_by_id(store):
    data = make_imageset(n=10, size=4)
    key = _key()
    staged = store.begin(key)
    shuffled = data.take(np.r_[5:10, 0:5])  # one file, two blocks written in completion order
    pq.write_table(imageset_table(shuffled), f"{staged.path}/part-0.parquet", filesystem=store.fs)
    store.commit(staged, kind="purified", config=CONFIG, inputs=INPUTS, rows=10)
    back, _ = store.get_imageset(key)
    assert np.array_equal(back.ids, data.ids) and np.array_equal(back.images, data.images)


def test_commit_refuses_a_mismatched_key_and_an_empty_staging_dir(store):
    with pytest.raises(ValueError, match="does not match"):
        store.commit(store.begin(_key()), kind="purified", config={**CONFIG, "steps": 1}, inputs=INPUTS)
    with pytest.raises(ValueError, match="does not match"):
        store.put_imageset(_key(), make_imageset(n=2, size=4), kind="purified", config=CONFIG, inputs=())
    with pytest.raises(StoreError, match="nothing was written"):
        store.commit(store.begin(_key()), kind="purified", config=CONFIG, inputs=INPUTS)
    assert not store.exists(_key()) and store.gc() == []


# ---------------------------------------------------------------------------------------------- get_or_build


def _counting_builder(store: ArtifactStore, calls: list, n: int = 8):
    """A build function that stages an n-image set and records each call's staging path in ``calls``."""
    def build(staged: StagedArtifact) -> dict:
        calls.append(staged.path)
        rows = store.stage_imageset(staged, make_imageset(n=n, size=4))
        return {"rows": rows, "timings": {"purify_s": 0.25}}
    return build


def test_get_or_build_builds_once_for_two_requests(store):
    calls: list = []
    build = _counting_builder(store, calls)
    first, built1 = store.get_or_build(_key(), build, kind="purified", config=CONFIG, inputs=INPUTS)
    second, built2 = store.get_or_build(_key(), build, kind="purified", config=CONFIG, inputs=INPUTS)
    assert (built1, built2) == (True, False) and len(calls) == 1 and first == second
    assert first["rows"] == 8 and first["timings"]["purify_s"] == 0.25 and first["timings"]["build_s"] >= 0


def test_a_failing_build_leaves_nothing(store):
    def build(staged):
        store.stage_imageset(staged, make_imageset(n=4, size=4))
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        store.get_or_build(_key(), build, kind="purified", config=CONFIG, inputs=INPUTS)
    assert not store.exists(_key()) and store.gc() == []


@pytest.mark.parametrize("crash_point", ["_move_dir", "_write_manifest"])
def test_crash_before_the_manifest_leaves_no_artifact_and_the_next_request_rebuilds(store, monkeypatch,
                                                                                   crash_point):
    calls: list = []
    build = _counting_builder(store, calls)
    key = _key()
    with monkeypatch.context() as patch:
        def crash(*args, **kwargs):
            raise Crash(crash_point)
        patch.setattr(ArtifactStore, crash_point, crash)
        with pytest.raises(Crash):
            store.get_or_build(key, build, kind="purified", config=CONFIG, inputs=INPUTS)
    assert not store.exists(key) and key not in [m["key"] for m in store.ls()]
    with pytest.raises(StoreError, match=key):
        store.get_imageset(key)
    leftover = Path(store.root) / key
    assert leftover.is_dir() == (crash_point == "_write_manifest")
    manifest, built = store.get_or_build(key, build, kind="purified", config=CONFIG, inputs=INPUTS)
    assert built and len(calls) == 2
    assert store.get_imageset(key, verify=True)[0].ids.tolist() == list(range(100, 108))
    removed = store.gc()
    assert store.exists(key) and store.manifest(key) == manifest
    assert removed == ([] if crash_point == "_write_manifest" else [f".tmp/{Path(calls[0]).name}"])


def test_an_ordinary_error_in_the_manifest_write_cleans_up(store, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ArtifactStore, "_write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        _put(store)
    assert store.ls() == [] and store.gc() == [] and not list(Path(store.root).glob("purified-*"))


# ------------------------------------------------------------------------------------------------ ls, rm, gc


def test_gc_removes_staging_leftovers_and_manifestless_dirs_but_spares_young_ones_with_a_margin(store):
    key, _, _ = _put(store)
    abandoned = store.begin(_key(kind="jpeg"))
    Path(abandoned.path, "half.parquet").write_bytes(b"PAR1")
    (Path(store.root) / "ebm-0000000000000000").mkdir()
    assert store.gc(older_than_s=3600) == []
    assert sorted(store.gc()) == [f".tmp/{Path(abandoned.path).name}", "ebm-0000000000000000"]
    assert store.gc() == [] and store.exists(key)


def test_ls_rm_and_missing_keys(store):
    assert store.ls() == []
    key_a, _, _ = _put(store, steps=1)
    key_b, _, _ = _put(store, steps=2)
    assert [m["key"] for m in store.ls()] == [key_a, key_b]
    store.rm(key_a)
    assert [m["key"] for m in store.ls()] == [key_b] and not (Path(store.root) / key_a).exists()
    for call in (store.rm, store.manifest, store.get_imageset, store.get_dir, store.imageset_path):
        with pytest.raises(StoreError, match=f"'{key_a}' not found in store {store.uri}"):
            call(key_a)
    with pytest.raises(StoreError, match="invalid artifact key"):
        store.exists("../etc")


# ------------------------------------------------------------------------------------------------------ URIs


def test_invalid_and_unusable_uris_are_store_errors_naming_them(tmp_path):
    with pytest.raises(StoreError, match="nosuchscheme://x.*not usable") as info:
        ArtifactStore("nosuchscheme://x")
    assert isinstance(info.value, UserInputError)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="afile.*is a file"):
        ArtifactStore(tmp_path / "afile")


def test_file_uri_and_relative_paths_address_the_same_store(tmp_path, monkeypatch):
    key, data, _ = _put(ArtifactStore(f"file://{tmp_path}/s"))
    monkeypatch.chdir(tmp_path)
    relative = ArtifactStore("s")
    assert relative.uri == str(tmp_path / "s") and relative.local and relative.exists(key)
    assert np.array_equal(relative.get_imageset(key)[0].images, data.images)


# ----------------------------------------------------------------------------------------------- directories


def _model_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(3000))
    (path / "config.json").write_text(json.dumps({"kind": "ebm", "model": {"nf": 8}}))
    (path / "sub" / "extra.bin").write_bytes(b"123")
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and p.name != MANIFEST}


def test_put_dir_get_dir_roundtrip(store, tmp_path):
    src = _model_dir(tmp_path / "ckpt")
    key = _key({"nf": 8}, (), kind="ebm")
    manifest = store.put_dir(key, src, kind="ebm", config={"nf": 8}, timings={"train_s": 3.0})
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "sub/extra.bin"]
    assert manifest["rows"] is None and manifest["files"]["sub/extra.bin"]["bytes"] == 3
    out = store.get_dir(key, verify=True)
    assert out == Path(store.root) / key and _files(out) == _files(src)
    with pytest.raises(StoreError, match="nope: not a directory"):
        store.put_dir(_key({"nf": 9}, (), kind="ebm"), tmp_path / "nope", kind="ebm", config={"nf": 9})


# -------------------------------------------------------------------------------------------- remote-like fs


class ObjectStoreLike(pafs.FileSystemHandler):
    """Local files behind a non-local filesystem that, like S3/GCS, cannot rename directories."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def move(self, src, dest):
        if self.fs.get_file_info(src).type == pafs.FileType.Directory:
            raise NotImplementedError("directory rename")
        self.fs.move(src, dest)

    def get_type_name(self):
        return "objectstorelike"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def test_a_remote_like_store_copies_instead_of_renaming_and_reads_through_its_filesystem(tmp_path):
    remote = ArtifactStore(str(tmp_path / "bucket"), filesystem=pafs.PyFileSystem(ObjectStoreLike()))
    assert not remote.local
    key, data, manifest = _put(remote)
    back, poisoned = remote.get_imageset(key, verify=True)
    assert np.array_equal(back.images, data.images) and poisoned.sum() == 2
    src = _model_dir(tmp_path / "ckpt")
    dkey = _key({"nf": 8}, (), kind="ebm")
    remote.put_dir(dkey, src, kind="ebm", config={"nf": 8})
    out = remote.get_dir(dkey, tmp_path / "download", verify=True)
    assert out == tmp_path / "download" and _files(out) == _files(src)
    assert remote.gc() == [] and [m["key"] for m in remote.ls()] == [key, dkey]


# -------------------------------------------------------------------------------------------------- CLI text


def test_format_table_and_show(store):
    assert format_table([]) == "no artifacts"
    key, _, manifest = _put(store)
    lines = format_table(store.ls()).splitlines()
    assert lines[0].split() == ["KEY", "KIND", "ROWS", "SIZE", "CREATED"] and len(lines) == 2
    assert lines[1].split()[:3] == [key, "purified", "12"] and manifest["created"][:10] in lines[1]
    assert json.loads(show(store, key)) == manifest
    assert [human_bytes(n) for n in (5, 1536, 3 << 20)] == ["5 B", "1.5 KiB", "3.0 MiB"]


def test_a_reader_store_creates_nothing_and_reads_as_empty(tmp_path):
    root = tmp_path / "absent" / "store"
    store = ArtifactStore(root, create=False)
    assert store.ls() == [] and not store.exists("poison-0123456789abcdef")
    assert not root.exists() and not (tmp_path / "absent").exists()
