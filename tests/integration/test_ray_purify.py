"""Ray Data purification under a local Ray (2 CPUs, small object store): equals the in-process defense
byte for byte, whatever the actor count or batch size; every id exactly once; JPEG through a task pool;
survives a killed actor; bad inputs are clear errors before any Ray work. One Ray session for the module."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import EBMConfig, LangevinConfig
from puregen_dist.data.io import META_KEY, read_imageset, write_imageset
from puregen_dist.defenses.jpeg import JPEGConfig, JPEGDefense
from puregen_dist.defenses.puregen import PureGenDefense, PureGenEBMConfig, PureGenFiltConfig
from puregen_dist.generative.checkpoints import save_checkpoint
from puregen_dist.generative.ebm import build_ebm
from puregen_dist.types import ImageSet

ray = pytest.importorskip("ray")

from puregen_dist.pipeline import purify as purify_module  # noqa: E402  (needs ray)
from puregen_dist.pipeline.actors import PurifierActor  # noqa: E402
from puregen_dist.pipeline.purify import (  # noqa: E402
    RayPurifyConfig,
    ensure_ray,
    purify_parquet,
    read_purified,
)

pytestmark = pytest.mark.ray

SEED = 3
N = 100
POISONED = np.arange(100, 200, 9, dtype=np.int64)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (reused, not shut down, when the process already has one)."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                           ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")):
            env.setenv(key, os.environ.get(key, value))
        owned = not ray.is_initialized()
        if owned:
            ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=150 * 2**20,
                     include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.enable_progress_bars
        ctx.enable_progress_bars = False
        yield
        ctx.enable_progress_bars = saved
        if owned:
            ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random EBM checkpoint and a Parquet image set of N random 16x16x1 images (ids 100..199)."""
    root = tmp_path_factory.mktemp("ray_purify")
    torch.manual_seed(0)
    cfg = EBMConfig(nf=8, in_channels=1, image_size=16)
    ckpt = save_checkpoint(root / "ebm", build_ebm(cfg), kind="ebm", model_config=dataclasses.asdict(cfg))
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (N, 16, 16, 1), dtype=np.uint8), (np.arange(N) % 4).astype(np.int64),
                    np.arange(100, 100 + N, dtype=np.int64), ("a", "b", "c", "d"))
    write_imageset(data, root / "input" / "train.parquet", poisoned_ids=POISONED)
    return {"root": root, "ckpt": str(ckpt), "data": data, "input": str(root / "input")}


@pytest.fixture(scope="module")
def ebm_cfg(workdir) -> PureGenEBMConfig:
    return PureGenEBMConfig(ebm=workdir["ckpt"], langevin=LangevinConfig(steps=5), device="cpu")


@pytest.fixture(scope="module")
def reference(workdir, ebm_cfg) -> ImageSet:
    """The in-process purification (the ground truth)."""
    return PureGenDefense(ebm_cfg).apply(workdir["data"], seed=SEED)


def run(workdir, tmp_path, cfg, name: str, **ray_cfg) -> tuple[ImageSet, np.ndarray]:
    out = tmp_path / name
    stats = purify_parquet(workdir["input"], str(out), cfg, seed=SEED, ray_cfg=RayPurifyConfig(**ray_cfg))
    assert stats.images == N and stats.seconds > 0 and stats.images_per_second > 0
    return read_purified(str(out))


def assert_complete(out: ImageSet, poisoned: np.ndarray, data: ImageSet) -> None:
    """Every id exactly once (read_purified also refuses duplicates), labels and flags kept."""
    np.testing.assert_array_equal(out.ids, data.ids)
    np.testing.assert_array_equal(out.labels, data.labels)
    np.testing.assert_array_equal(poisoned, np.isin(data.ids, POISONED))
    assert out.classes == data.classes and out.shape == data.shape


def test_one_actor_equals_in_process(ray_local, workdir, tmp_path, ebm_cfg, reference):
    out, poisoned = run(workdir, tmp_path, ebm_cfg, "a1", actors=1, batch_size=64)
    assert_complete(out, poisoned, workdir["data"])
    np.testing.assert_array_equal(out.images, reference.images)
    assert not np.array_equal(out.images, workdir["data"].images)
    files = list((tmp_path / "a1").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert pa.types.is_fixed_size_list(schema.field("image").type) and META_KEY in schema.metadata
    single, _ = read_imageset(files[0])  # each output file is itself a valid image set
    assert single.shape == (16, 16, 1) and single.classes == workdir["data"].classes


def test_actor_accepts_numpy_batches(ray_local, workdir, ebm_cfg, reference):
    """What Ray hands over with batch_format="numpy": a fixed_size_list column is a (B,) object array of
    (H*W*C,) uint8 arrays; a tensor column a (B, ...) uint8 array. The image column comes back alike."""
    data, rows = workdir["data"], slice(10, 17)
    actor = PurifierActor(ebm_cfg, SEED, data.shape)
    flat = data.images[rows].reshape(7, -1)
    objects = np.empty(7, dtype=object)
    for i, row in enumerate(flat):
        objects[i] = row
    base = {"id": data.ids[rows], "label": data.labels[rows], "poisoned": np.zeros(7, bool)}
    for column in (objects, flat, data.images[rows]):
        out = actor({**base, "image": column})
        image = out["image"]
        assert image.dtype == column.dtype and image.shape == column.shape
        got = np.stack(list(image)) if image.dtype == object else image
        np.testing.assert_array_equal(got.reshape(7, *data.shape), reference.images[rows])
        assert out["id"] is base["id"] and out["label"] is base["label"]


def test_two_actors_small_batches_identical(ray_local, workdir, tmp_path, ebm_cfg, reference):
    # 0.5 CPU each: two 1-CPU actors would hold both CPUs and starve the read/write tasks (a hang).
    out, poisoned = run(workdir, tmp_path, ebm_cfg, "a2", actors=2, batch_size=7, num_cpus_per_actor=0.5)
    assert_complete(out, poisoned, workdir["data"])
    np.testing.assert_array_equal(out.images, reference.images)


def test_read_blocks_are_about_one_batch_and_context_is_restored(ray_local, workdir):
    """Both actors get work from a single small file: the read emits several bounded blocks."""
    source = purify_module.inspect_input(workdir["input"])
    before = ray.data.DataContext.get_current().target_max_block_size
    cfg = RayPurifyConfig(batch_size=8, actors=2)
    assert purify_module.block_rows(N, cfg) == 13  # about 4 blocks per actor, >= one batch
    assert purify_module.block_rows(50_000, cfg) == 1024 and purify_module.block_rows(10, cfg) == 8
    dataset = purify_module.read_dataset(source, cfg)
    assert ray.data.DataContext.get_current().target_max_block_size == before
    rows = [len(batch["id"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(rows) == N and len(rows) >= 6 and max(rows) <= 26


def test_jpeg_task_pool_equals_in_process(ray_local, workdir, tmp_path):
    cfg = JPEGConfig(quality=50)
    out, poisoned = run(workdir, tmp_path, cfg, "jpeg", batch_size=16, cpu_tasks=2)
    assert_complete(out, poisoned, workdir["data"])
    np.testing.assert_array_equal(out.images, JPEGDefense(cfg).apply(workdir["data"], seed=SEED).images)


def test_puregen_filt_equals_in_process(ray_local, workdir, tmp_path):
    cfg = PureGenFiltConfig(ebm=workdir["ckpt"], langevin=LangevinConfig(steps=5), filter_fraction=0.3,
                            device="cpu")
    out, poisoned = run(workdir, tmp_path, cfg, "filt", actors=1, batch_size=32)
    assert_complete(out, poisoned, workdir["data"])
    expected = PureGenDefense(cfg).apply(workdir["data"], seed=SEED)  # the config class says: rank by energy
    np.testing.assert_array_equal(out.images, expected.images)
    assert (out.images != workdir["data"].images).any(axis=(1, 2, 3)).sum() == 30


def crash_once_actor(marker: str) -> type[PurifierActor]:
    """A PurifierActor that hard-exits on its second batch unless ``marker`` exists (it creates it first): one
    actor death per run. Defined in a function so that Ray pickles the class by value."""

    class CrashOnceActor(PurifierActor):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return super().__call__(batch)

    return CrashOnceActor


def test_killed_actor_still_complete(ray_local, workdir, tmp_path, ebm_cfg, reference, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setattr(purify_module, "PurifierActor", crash_once_actor(str(marker)))
    out, poisoned = run(workdir, tmp_path, ebm_cfg, "killed", actors=1, batch_size=10)
    assert marker.exists(), "the actor never crashed"
    assert_complete(out, poisoned, workdir["data"])
    np.testing.assert_array_equal(out.images, reference.images)


def test_wrong_schema_names_the_file(ray_local, workdir, tmp_path):
    bad = tmp_path / "bad" / "images.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"x"] * 3), "id": [1, 2, 3], "label": [0, 0, 0]}), bad)
    with pytest.raises(UserInputError, match="images.parquet"):
        purify_parquet(str(bad.parent), str(tmp_path / "out"), JPEGConfig(), seed=SEED)
    typed = tmp_path / "typed.parquet"
    table = pq.read_table(next((workdir["root"] / "input").glob("*.parquet")))
    pq.write_table(table.set_column(1, "id", table.column("id").cast(pa.string())), typed)
    with pytest.raises(UserInputError, match=r"typed\.parquet: wrong schema \(id is string"):
        purify_parquet(str(typed), str(tmp_path / "out2"), JPEGConfig(), seed=SEED)


def test_missing_checkpoint_names_it(ray_local, workdir, tmp_path):
    missing = tmp_path / "no_such_ebm"
    cfg = PureGenEBMConfig(ebm=str(missing), langevin=LangevinConfig(steps=5))
    with pytest.raises(UserInputError, match="no_such_ebm"):
        purify_parquet(workdir["input"], str(tmp_path / "out"), cfg, seed=SEED)
    assert not (tmp_path / "out").exists()


def test_refuses_nonempty_output_and_reuses_session(ray_local, workdir, tmp_path):
    out = tmp_path / "out"
    write_imageset(workdir["data"], out / "old.parquet")
    with pytest.raises(UserInputError, match="already holds Parquet"):
        purify_parquet(workdir["input"], str(out), JPEGConfig(), seed=SEED)
    ensure_ray()  # already connected: a no-op
    assert ray.is_initialized()
