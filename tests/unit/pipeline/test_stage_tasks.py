"""Model and poison artifacts (the bodies of the Ray tasks, called in-process here) and model references by
artifact key: keys follow the content, a second build is a cache hit, bad references name the key."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest

from puregen_dist.attacks import build_attack
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import EBMJob, PurifyJob
from puregen_dist.config.loading import build
from puregen_dist.data.datasets import load_data
from puregen_dist.defenses.jpeg import JPEGConfig
from puregen_dist.defenses.puregen import PureGenEBMConfig, PureGenNaiveConfig
from puregen_dist.generative.purifiers import load_ebm
from puregen_dist.pipeline.models import model_fingerprints, resolve_models
from puregen_dist.pipeline.stages import (
    build_model_artifact,
    build_poison_artifact,
    changed_rows,
    clean_source,
    model_artifact,
    poison_artifact,
    read_target,
)
from puregen_dist.pipeline.store import ArtifactStore, StoreError
from puregen_dist.types import ImageSet

TINY_EBM = {"seed": 1, "data": {"dataset": "digits", "train_per_class": 6},
            "ebm": {"nf": 8, "in_channels": 1, "image_size": 16},
            "train": {"epochs": 1, "batch_size": 20, "bank_size": 40, "mcmc_steps": 2, "milestones": [],
                      "sample_grid": 0},
            "tracking": {"enabled": False}}


def _ebm_job(**changes) -> EBMJob:
    return dataclasses.replace(build(EBMJob, TINY_EBM, source="test"), **changes)


def test_model_key_follows_what_changes_the_weights():
    _, key, config = model_artifact(_ebm_job())
    assert key.startswith("ebm-") and "output" not in config and "device" not in config["train"]
    same = _ebm_job(output="elsewhere", store="s3://bucket/x", name="renamed",
                    train=dataclasses.replace(_ebm_job().train, device="cpu", checkpoint_every=5))
    assert model_artifact(same)[1] == key
    assert model_artifact(_ebm_job(seed=2))[1] != key
    assert model_artifact(_ebm_job(train=dataclasses.replace(_ebm_job().train, epochs=2)))[1] != key


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny EBM trained into a fresh store by the task body: (store, key, first manifest, built)."""
    root = tmp_path_factory.mktemp("models")
    store = ArtifactStore(root / "store")
    manifest, built = build_model_artifact(_ebm_job(), store.uri, str(root))
    return store, manifest["key"], manifest, built


def test_model_artifact_is_trained_once_and_loads(trained):
    store, key, manifest, built = trained
    assert built and manifest["kind"] == "ebm" and key == model_artifact(_ebm_job())[1]
    assert {"model.safetensors", "config.json"} <= set(manifest["files"])
    assert manifest["timings"]["train_s"] > 0
    assert not (Path(tempfile.gettempdir()) / "puregen-work" / key).exists()  # work dir removed
    again, built_again = build_model_artifact(_ebm_job(output="ignored"), store.uri, "unused")
    assert not built_again and again["created"] == manifest["created"]
    energy, cfg = load_ebm(store.get_dir(key))
    assert cfg.nf == 8 and sum(p.numel() for p in energy.parameters()) > 0


def test_model_keys_resolve_to_store_directories(trained):
    store, key, _, _ = trained
    resolved = resolve_models(PureGenEBMConfig(ebm=key), store)
    assert Path(resolved.ebm) == Path(store.get_dir(key))
    assert resolve_models(PureGenEBMConfig(ebm=key), store.uri) == resolved
    assert model_fingerprints(PureGenEBMConfig(ebm=key)) == {"ebm": key}  # content-addressed already
    path_cfg = PureGenEBMConfig(ebm=resolved.ebm)
    assert resolve_models(path_cfg, store) is path_cfg and resolve_models(JPEGConfig(), None) == JPEGConfig()


def test_bad_model_references_name_the_key(trained, tmp_path):
    store, key, _, _ = trained
    missing = "ebm-" + "0" * 16
    with pytest.raises(StoreError, match=f"defense.ebm: model artifact '{missing}' not found in store"):
        resolve_models(PureGenEBMConfig(ebm=missing), store)
    with pytest.raises(StoreError, match=f"defense.ddpm: artifact '{key}' .* is a 'ebm' artifact"):
        resolve_models(PureGenNaiveConfig(ebm=key, ddpm=key), store)
    with pytest.raises(StoreError, match="no artifact store"):
        resolve_models(PureGenEBMConfig(ebm=key), None)
    with pytest.raises(UserInputError, match="checkpoint directory not found"):
        model_fingerprints(PureGenEBMConfig(ebm=str(tmp_path / "nowhere")))


def test_poison_artifact_is_crafted_once(tmp_path):
    job = build(PurifyJob, {"seed": 3, "data": {"dataset": "digits", "train_per_class": 5},
                            "attack": {"name": "badnets", "budget": 0.2}}, source="test")
    store = ArtifactStore(tmp_path / "store")
    manifest, built = build_poison_artifact(job, store.uri)
    key, config = poison_artifact(job)
    assert built and manifest["key"] == key and manifest["kind"] == "poison" and manifest["rows"] == 50
    data, poisoned = store.get_imageset(key)
    assert len(data) == 50 and poisoned.sum() == 10 and np.all(np.diff(data.ids) > 0)
    assert build_poison_artifact(dataclasses.replace(job, output="other"), store.uri)[1] is False
    target = read_target(store, key)  # what a trial needs to measure poison success
    crafted = build_attack(job.attack).craft(load_data(job.data)[0], seed=3).target
    assert target.kind == "triggered" and target.target_class == crafted.target_class
    assert np.array_equal(target.trigger, crafted.trigger) and target.trigger.dtype == np.float32
    assert (target.trigger_mask is None) == (crafted.trigger_mask is None)
    assert poison_artifact(dataclasses.replace(job, seed=4))[0] != key


def test_triggerless_target_images_round_trip_through_the_poison_artifact(tmp_path):
    """An imported poisoning-benchmark trial (``toxic``): its target images and true labels are stored with
    the poison set and read back with their dtypes."""
    import pickle

    from PIL import Image

    data = {"dataset": "digits", "train_per_class": 5}
    train = load_data(build(PurifyJob, {"data": data}, source="test").data)[0]
    base = train.ids[train.labels == 3]
    poisons = [(Image.fromarray(img[..., 0], "L"), 3) for img in train.images[train.positions(base)]]
    target = np.full((*train.shape[:2],), 200, np.uint8)
    trial = tmp_path / "trial"
    trial.mkdir()
    for name, obj in (("poisons", poisons), ("base_indices", base.tolist()),
                      ("target", (Image.fromarray(target, "L"), 5))):
        (trial / f"{name}.pickle").write_bytes(pickle.dumps(obj))
    job = build(PurifyJob, {"data": data, "attack": {"name": "toxic", "path": str(trial)}}, source="test")
    store = ArtifactStore(tmp_path / "store")
    manifest, built = build_poison_artifact(job, store.uri)
    stored = read_target(store, manifest["key"])
    assert built and stored.kind == "triggerless" and stored.adversarial_label == 3
    assert stored.target_images.dtype == np.uint8 and stored.target_images.shape == (1, *train.shape)
    assert np.all(stored.target_images == 200)
    assert stored.target_labels.dtype == np.int64 and stored.target_labels.tolist() == [5]
    assert stored.trigger is None and stored.target_class is None
    (trial / "README").write_text("not read by the attack")  # only the three pickles identify the trial
    assert build_poison_artifact(job, store.uri)[1] is False


def test_a_generative_model_trains_on_a_poison_set_artifact(tmp_path):
    """PureGen Table 3's setting: ``train_on`` a poison-set key; the model's key follows the poison set, the
    training split is the poisoned images, and without a store the key is refused before anything is written."""
    store = ArtifactStore(tmp_path / "store")
    poison_job = build(PurifyJob, {"data": TINY_EBM["data"], "seed": 0,
                                   "attack": {"name": "badnets", "budget": 0.2, "trigger": "sign"}}, source="test")
    poison_key = build_poison_artifact(poison_job, store.uri)[0]["key"]
    clean, on_poison = _ebm_job(), _ebm_job(train_on=poison_key)
    _, key, config = model_artifact(on_poison)
    assert key != model_artifact(clean)[1] and config["models"] == {"train_on": poison_key}
    assert "train_on" not in model_artifact(clean)[2]  # unset: the clean job's key is unchanged

    from puregen_dist.jobs import training_data

    train, _ = training_data(resolve_models(on_poison, store, "job"))
    poisoned, flags = store.get_imageset(poison_key)
    assert np.array_equal(train.images, poisoned.images) and flags.sum() == round(0.2 * len(train))
    with pytest.raises(UserInputError, match="job.train_on: .*no artifact store"):
        resolve_models(on_poison, None, "job")
    manifest, built = build_model_artifact(on_poison, store.uri, str(tmp_path))
    assert built and manifest["key"] == key and manifest["config"]["models"] == {"train_on": poison_key}


def test_changed_rows_finds_new_ids_and_changed_bytes_only():
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.zeros(6, np.int64),
                     np.arange(10, 16, dtype=np.int64), ("a",))
    images = clean.images[[0, 1, 2, 4]].copy()
    images[1, 3, 3, 2] ^= 1  # one bit of one pixel
    data = ImageSet(np.concatenate([images, clean.images[:1]]), np.zeros(5, np.int64),
                    np.array([10, 11, 12, 14, 99], np.int64), ("a",))  # id 99: a row the attack added
    assert changed_rows(data, clean).tolist() == [False, True, False, False, True]
    empty = ImageSet(clean.images[:0], clean.labels[:0], clean.ids[:0], ("a",))
    assert changed_rows(data, empty).all()


def test_clean_source_only_for_rowwise_defenses_of_poisoned_sets():
    def job(attack: str, defense: dict) -> PurifyJob:
        return build(PurifyJob, {"attack": {"name": attack}, "defense": defense}, source="test")

    ebm = {"name": "puregen_ebm", "ebm": "some/dir"}
    assert clean_source(job("badnets", ebm)).attack.name == "none"
    assert clean_source(job("badnets", {"name": "jpeg"})).defense.name == "jpeg"
    assert clean_source(job("none", ebm)) is None
    filt = clean_source(job("badnets", {"name": "puregen_filt", "ebm": "x", "ddpm": "y"}))  # per selected row
    assert filt.attack.name == "none" and filt.defense.name == "puregen_filt"
    assert clean_source(job("badnets", {"name": "none"})) is None  # not rowwise: the whole set each time
