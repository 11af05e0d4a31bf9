"""`puregen-dist purify` through Ray Data and the artifact store: the poison and purified sets are built once
per content key, a second request is a cache hit, and the result equals the in-process (--no-ray) one."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from puregen_dist.cli import main
from puregen_dist.data.io import read_imageset
from puregen_dist.pipeline.store import ArtifactStore

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_session):
    """Every test of this module runs under the module's local Ray."""


def test_ray_purify_is_cached_and_equals_in_process(tmp_path, tiny_checkpoints, capsys):
    ebm, _ = tiny_checkpoints[1]
    config = tmp_path / "purify.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 4, "output": str(tmp_path / "local.parquet"), "store": str(tmp_path / "store"),
        "data": {"dataset": "digits", "train_per_class": 4},
        "attack": {"name": "badnets", "budget": 0.2, "trigger": "sign"},
        "defense": {"name": "puregen_ebm", "ebm": str(ebm), "langevin": {"steps": 3}, "batch_size": 8},
        "pipeline": {"actors": 1, "batch_size": 16}}))
    assert main(["-q", "purify", str(config)]) == 0
    first = capsys.readouterr().out
    assert "built:" in first and "images/s" in first
    assert main(["-q", "purify", str(config), "--set", "defense.batch_size=32"]) == 0  # execution-only change
    assert "cached (already in the store)" in capsys.readouterr().out
    store = ArtifactStore(tmp_path / "store")
    # the clean set (attack none) and its purified set are built once, beside the poison set's
    kinds = sorted(m["kind"] for m in store.ls())
    assert kinds == ["poison", "poison", "purified", "purified"]
    purified_key = first.split("purified set ")[1].split()[0]
    via_ray, poisoned = store.get_imageset(purified_key)
    assert store.manifest(purified_key)["stats"] == {"rows_purified": 8.0, "rows_reused": 32.0}
    assert "purified 8 changed rows; reused 32 purified clean rows" in first
    assert main(["-q", "purify", str(config), "--no-ray"]) == 0  # the whole set, in process
    local, local_poisoned = read_imageset(tmp_path / "local.parquet")
    assert np.array_equal(via_ray.ids, local.ids) and np.array_equal(via_ray.images, local.images)
    assert np.array_equal(via_ray.labels, local.labels)
    assert np.array_equal(poisoned, local_poisoned) and poisoned.sum() == 8


FILT = {"name": "puregen_filt", "diffusion": {"steps": 2}, "batch_size": 8}


@pytest.mark.parametrize("defense", [{"name": "puregen_ebm", "langevin": {"steps": 3}, "batch_size": 8},
                                     {"name": "jpeg", "quality": 25}, FILT], ids=["ebm", "jpeg", "filt"])
def test_each_image_is_purified_once_and_equals_the_whole_set(tmp_path, tiny_checkpoints, defense):
    """Two poison sets of the same data and seed share one purified clean set; each purifies only its poisons
    (5 rows: one batch, in one Ray task; 10 rows: through Ray Data), and the assembled set equals purifying the
    whole poison set, byte for byte. PureGen-Filt ranks each set afresh: it purifies
    the selected rows that are poisons or that the clean ranking left out, and reuses the rest of its selection.
    The reference is the whole set purified in process: the assembled set (its rows purified through Ray Data and
    Ray tasks) must give the in-process bytes, the DDPM stage of PureGen-Filt included."""
    from puregen_dist.config.generative import PurifyJob
    from puregen_dist.config.loading import build
    from puregen_dist.defenses import build_defense
    from puregen_dist.pipeline.stages import poison_stage, purify_stage, rows_to_purify

    if defense["name"].startswith("puregen"):
        defense = {**defense, "ebm": str(tiny_checkpoints[1][0]), "ddpm": str(tiny_checkpoints[1][1])}
    if defense["name"] == "puregen_ebm":
        del defense["ddpm"]
    store = ArtifactStore(tmp_path / "store")
    base = {"seed": 2, "store": str(tmp_path / "store"), "data": {"dataset": "digits", "train_per_class": 5},
            "defense": defense, "pipeline": {"actors": 1, "batch_size": 8}}
    results = []
    for attack in ({"name": "badnets", "budget": 0.1, "target_class": 1},
                   {"name": "badnets", "budget": 0.2, "target_class": 7}):
        job = build(PurifyJob, {**base, "attack": attack}, source="test")
        poison = poison_stage(job, store)
        expected_rows = store.count_poisoned(poison.key)
        assert rows_to_purify(job, poison.key, store) == expected_rows
        result = purify_stage(job, poison.key, store)
        assert result.built
        stats = result.manifest["stats"]
        if defense["name"] == "puregen_filt":
            assert stats["rows_purified"] + stats["rows_reused"] == 25 == stats["rows_unselected"]  # k = 0.5
            assert 0 < stats["rows_reused"] and stats["rows_purified"] < 25
        else:
            assert stats == {"rows_purified": float(expected_rows), "rows_reused": float(50 - expected_rows)}
        # the reference: the whole poison set purified in process (no actor start-up of another pipeline)
        poisoned, poisoned_flags = store.get_imageset(poison.key)
        reference = build_defense(job.defense).apply(poisoned, seed=job.seed)
        assembled, flags = store.get_imageset(result.key)
        for name in ("ids", "labels", "images"):
            assert np.array_equal(getattr(assembled, name), getattr(reference, name)), name
        assert np.array_equal(flags, poisoned_flags) and flags.sum() == expected_rows > 0
        results.append(result)
    kinds = sorted(m["kind"] for m in store.ls())
    assert kinds == ["poison"] * 3 + ["purified"] * 3  # one clean set and its purified set, shared
    clean = [m for m in store.ls() if m["kind"] == "purified" and m["key"] not in {r.key for r in results}]
    if defense["name"] == "puregen_filt":  # half the set purified, and which half is recorded with every set
        assert clean[0]["stats"] == {"rows_purified": 25.0, "rows_reused": 0.0, "rows_unselected": 25.0}
        assert all("selected_ids.json" in m["files"] for m in store.ls() if m["kind"] == "purified")
    else:
        assert clean[0]["stats"] == {"rows_purified": 50.0, "rows_reused": 0.0}  # the whole set went through
    for result in results:  # reported cost: the shared clean purification plus the set's own rows
        timings = result.manifest["timings"]
        assert timings["changed_rows_purify_s"] > 0
        assert timings["purify_s"] == pytest.approx(clean[0]["timings"]["purify_s"] + timings["changed_rows_purify_s"])


def test_retrained_model_changes_the_purified_key(tiny_checkpoints):
    from puregen_dist.defenses.puregen import PureGenEBMConfig
    from puregen_dist.pipeline.models import model_fingerprints

    one = model_fingerprints(PureGenEBMConfig(ebm=str(tiny_checkpoints[1][0])))
    three = model_fingerprints(PureGenEBMConfig(ebm=str(tiny_checkpoints[3][0])))
    assert set(one) == {"ebm"} and one != three
    assert one == model_fingerprints(PureGenEBMConfig(ebm=str(tiny_checkpoints[1][0]), batch_size=3))


TINY_EBM_JOB = {"name": "tiny-ebm", "seed": 1, "output": "unused",
                "data": {"dataset": "digits", "train_per_class": 6},
                "ebm": {"nf": 8, "in_channels": 1, "image_size": 16},
                "train": {"epochs": 1, "batch_size": 20, "bank_size": 40, "mcmc_steps": 2, "milestones": [],
                          "sample_grid": 0},
                "resources": {"num_cpus": 0.5}, "tracking": {"enabled": False}}


def test_model_trained_as_ray_task_is_used_by_key(tmp_path, capsys):
    store_dir = tmp_path / "store"
    ebm_yaml = tmp_path / "ebm.yaml"
    ebm_yaml.write_text(yaml.safe_dump(TINY_EBM_JOB))
    assert main(["-q", "train-ebm", str(ebm_yaml), "--store", str(store_dir)]) == 0
    first = capsys.readouterr().out
    key = first.split()[2]
    assert key.startswith("ebm-") and "trained" in first and f"defense.ebm: {key}" in first
    assert main(["-q", "train-ebm", str(ebm_yaml), "--store", str(store_dir)]) == 0
    assert f"{key} cached (already in the store)" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()  # output is not used with a store

    purify_yaml = tmp_path / "purify.yaml"
    purify_yaml.write_text(yaml.safe_dump({
        "seed": 2, "output": str(tmp_path / "local.parquet"), "store": str(store_dir),
        "data": {"dataset": "digits", "train_per_class": 3},
        "attack": {"name": "badnets", "budget": 0.2},
        "defense": {"name": "puregen_ebm", "ebm": key, "langevin": {"steps": 2}},
        "pipeline": {"actors": 1, "batch_size": 8, "craft": {"num_cpus": 0.5}}}))
    assert main(["-q", "purify", str(purify_yaml)]) == 0
    store = ArtifactStore(store_dir)
    manifests = {m["kind"]: m for m in store.ls()}
    assert sorted(manifests) == ["ebm", "poison", "purified"]
    assert manifests["purified"]["config"]["models"] == {"ebm": key}
    via_ray, _ = store.get_imageset(manifests["purified"]["key"])
    assert main(["-q", "purify", str(purify_yaml), "--no-ray"]) == 0
    local, _ = read_imageset(tmp_path / "local.parquet")
    assert np.array_equal(via_ray.ids, local.ids) and np.array_equal(via_ray.images, local.images)


def test_missing_model_key_is_an_error_before_any_work(tmp_path, capsys):
    missing = "ebm-" + "a" * 16
    purify_yaml = tmp_path / "purify.yaml"
    purify_yaml.write_text(yaml.safe_dump({
        "store": str(tmp_path / "store"), "data": {"dataset": "digits", "train_per_class": 3},
        "defense": {"name": "puregen_ebm", "ebm": missing}}))
    assert main(["-q", "purify", str(purify_yaml)]) == 2
    assert f"model artifact '{missing}' not found in store" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() or ArtifactStore(tmp_path / "store").ls() == []


def test_tasks_get_the_configured_resources():
    import ray

    from puregen_dist.config.generative import TaskResources
    from puregen_dist.pipeline.stages import run_task

    def assigned() -> dict:
        return ray.get_runtime_context().get_assigned_resources()

    assert run_task(assigned, TaskResources(num_cpus=0.5)) == {"CPU": 0.5}
    assert run_task(assigned, TaskResources(num_cpus=2)) == {"CPU": 2.0}
