"""The contract of every attack variant: shapes and ids, the eps bound, the budget, the labels, seed
determinism, and a round trip through the content-addressed store.

``CASES`` lists the variants of each registered attack; an attack registered without cases here fails
:func:`test_every_registered_attack_has_contract_cases`.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from published_poisons import unit_trigger, write_ntga, write_toxic, write_trigger

from conftest import make_imageset
from puregen_dist.attacks import build_attack
from puregen_dist.attacks.badnets import BadNetsConfig
from puregen_dist.attacks.bullseye import BullseyeConfig
from puregen_dist.attacks.clean_label import CleanLabelTriggerConfig, poison_count
from puregen_dist.attacks.gradient_matching import GradientMatchingConfig
from puregen_dist.attacks.imports import NTGAConfig, ToxicConfig, TriggerFileConfig
from puregen_dist.attacks.narcissus import NarcissusConfig
from puregen_dist.attacks.surrogate import surrogate_meta
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.transfer import save_classifier
from puregen_dist.config.loading import key_dict
from puregen_dist.config.schema import AttackConfig, NoAttackConfig
from puregen_dist.pipeline.stages import TARGET_JSON, read_target, stage_target
from puregen_dist.pipeline.store import ArtifactStore, artifact_key
from puregen_dist.registry import registry_for
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

ATTACKS = registry_for("attack")


def _data() -> ImageSet:
    return make_imageset(n=64, size=8, channels=3, classes=4)  # ids 100..163, not positions


def _input_files() -> Path:
    """The files the import attacks and Narcissus read: published layouts written for ``_data()`` and a
    randomly initialised surrogate (POOD classes 0..1, target class 1), in a directory removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="attack-contract-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data = _data()
    write_trigger(root / "trigger.npy", unit_trigger(data.shape), "1chw", "symmetric")
    write_toxic(root / "toxic", data, data.ids[data.labels == 1][:6])
    write_ntga(root / "ntga", data)
    torch.manual_seed(0)
    net = build_classifier("small_cnn", in_channels=3, num_classes=3, image_size=8)
    save_classifier(root / "surrogate", net, name="small_cnn", in_channels=3, num_classes=3, image_size=8,
                    meta=surrogate_meta(2, [1], (0.5,) * 3, (0.5,) * 3))
    clean = build_classifier("small_cnn", in_channels=3, num_classes=4, image_size=8)
    save_classifier(root / "classifier", clean, name="small_cnn", in_channels=3, num_classes=4, image_size=8,
                    meta={"mean": [0.5] * 3, "std": [0.5] * 3})
    return root


FILES = _input_files()
NARCISSUS_FAST = {"warmup_epochs": 1, "rounds": 3, "batch_size": 8, "device": "cpu"}

CASES: dict[str, list[AttackConfig]] = {
    "none": [NoAttackConfig()],
    "badnets": [
        BadNetsConfig(trigger=trigger, label_mode=mode, budget=budget, target_class=1, **extra)
        for trigger, extra in (("patch", {"pattern": "random"}), ("sign", {"eps": 8 / 255}),
                               ("blend", {"alpha": 0.2}))
        for mode, budget in (("dirty", 0.1), ("clean", 0.05))
    ],
    "trigger_file": [
        TriggerFileConfig(path=str(FILES / "trigger.npy"), convention="symmetric", target_class=1, budget=0.1),
        TriggerFileConfig(path=str(FILES / "trigger.npy"), convention="symmetric", target_class=1, num_poisons=5,
                          selection="last"),
    ],
    "toxic": [ToxicConfig(path=str(FILES / "toxic"))],
    "ntga": [NTGAConfig(images=str(FILES / "ntga" / "x_train.npy"), labels=str(FILES / "ntga" / "y_train.npy"))],
    "gradient_matching": [
        GradientMatchingConfig(surrogate=str(FILES / "classifier"), poison_key=key, budget=0.05, iterations=2,
                               restarts=2, batch_size=8, device="cpu", **extra)
        for key, extra in ((0, {}), (1, {"eps": 8 / 255, "num_poisons": 4, "augment": False, "ensemble": (str(FILES / "classifier"),)}))
    ],
    "bullseye_polytope": [
        BullseyeConfig(substitutes=(str(FILES / "classifier"),), poison_key=key, target_class=0, poison_class=2,
                       iterations=3, device="cpu", **extra)
        for key, extra in ((0, {}), (1, {"eps": 8 / 255, "num_poisons": 3, "mode": "end2end", "net_repeat": 2,
                                         "dropout": (0.2,)}))
    ],
    "narcissus": [
        NarcissusConfig(surrogate=str(FILES / "surrogate"), target_class=1, eps=16 / 255, budget=0.1,
                        **NARCISSUS_FAST),
        NarcissusConfig(surrogate=str(FILES / "surrogate"), target_class=1, eps=8 / 255, num_poisons=4,
                        selection="last", **NARCISSUS_FAST),
    ],
}
SEED_FREE = {"toxic", "ntga", "gradient_matching", "bullseye_polytope"}
"""Attacks whose poisoned rows the seed does not choose: files, or a poison key (Gradient Matching, Bullseye)."""


def _case_id(cfg: AttackConfig) -> str:
    if isinstance(cfg, BadNetsConfig):
        return f"badnets-{cfg.trigger}-{cfg.label_mode}"
    if isinstance(cfg, CleanLabelTriggerConfig):
        return f"{cfg.name}-{cfg.selection}-{cfg.num_poisons or cfg.budget}"
    if isinstance(cfg, GradientMatchingConfig | BullseyeConfig):
        return f"{cfg.name}-key{cfg.poison_key}"
    return cfg.name


PARAMS = [pytest.param(cfg, id=_case_id(cfg)) for configs in CASES.values() for cfg in configs]


def _craft(cfg: AttackConfig, seed: int = 0) -> tuple[ImageSet, PoisonSet]:
    """Crafted as the pipeline does: with the clean test split (which triggerless attacks draw targets from)."""
    data = _data()
    test = make_imageset(n=16, size=8, channels=3, classes=4, seed=9)
    return data, build_attack(cfg).craft(data, seed=seed, test=test)


def _expected_count(cfg: AttackConfig, n: int) -> int:
    if isinstance(cfg, BadNetsConfig):
        return max(1, round(cfg.budget * n))
    if isinstance(cfg, NoAttackConfig):
        return 0
    if isinstance(cfg, CleanLabelTriggerConfig):
        return poison_count(cfg, _data())
    if isinstance(cfg, ToxicConfig):
        return 6
    if isinstance(cfg, NTGAConfig):
        return n
    if isinstance(cfg, GradientMatchingConfig):
        return cfg.num_poisons or max(1, round(cfg.budget * n))
    if isinstance(cfg, BullseyeConfig):
        return cfg.num_poisons
    raise AssertionError(f"no expected poison count for attack {cfg.name!r}: add it to _expected_count")


def test_every_registered_attack_has_contract_cases():
    assert set(CASES) == set(ATTACKS.names())


def test_cases_are_distinct_variants():
    ids = [p.id for p in PARAMS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("cfg", PARAMS)
def test_shapes_and_ids(cfg):
    data, ps = _craft(cfg)
    assert ps.poisoned.dtype == np.uint8 and ps.poisoned.shape == (len(ps.poison_ids), *data.shape)
    assert ps.poison_ids.dtype == np.int64 and ps.poison_labels.dtype == np.int64
    assert len(ps.poison_labels) == len(ps.poison_ids)
    assert set(ps.poison_ids.tolist()) <= set(data.ids.tolist())
    assert len(np.unique(ps.poison_ids)) == len(ps.poison_ids)
    out = ps.materialize()
    assert np.array_equal(out.ids, data.ids) and out.images.shape == data.images.shape
    assert out.classes == data.classes


@pytest.mark.parametrize("cfg", PARAMS)
def test_eps_bound_holds_on_every_poisoned_image(cfg):
    data, ps = _craft(cfg)
    if ps.eps >= 1.0:
        pytest.skip("unbounded (eps >= 1): a patch overwrites pixels")
    base = data.images[data.positions(ps.poison_ids)].astype(int)
    delta = np.abs(ps.poisoned.astype(int) - base)
    assert np.all(delta <= round(ps.eps * 255))


@pytest.mark.parametrize("cfg", PARAMS)
def test_budget_is_respected(cfg):
    data, ps = _craft(cfg)
    assert len(ps.poison_ids) == _expected_count(cfg, len(data))


@pytest.mark.parametrize("cfg", PARAMS)
def test_labels(cfg):
    data, ps = _craft(cfg)
    base_labels = data.labels[data.positions(ps.poison_ids)]
    if getattr(cfg, "label_mode", "clean") == "dirty":
        assert np.all(ps.poison_labels == cfg.target_class) and np.all(base_labels != cfg.target_class)
    else:
        assert np.array_equal(ps.poison_labels, base_labels)
    out = ps.materialize()
    untouched = ~np.isin(data.ids, ps.poison_ids)
    assert np.array_equal(out.labels[untouched], data.labels[untouched])


@pytest.mark.parametrize("cfg", PARAMS)
def test_seed_determinism(cfg):
    _, a = _craft(cfg, seed=0)
    _, b = _craft(cfg, seed=0)
    assert a.poisoned.tobytes() == b.poisoned.tobytes() and np.array_equal(a.poison_ids, b.poison_ids)
    assert np.array_equal(a.poison_labels, b.poison_labels) and a.eps == b.eps
    if len(a.poison_ids) and cfg.name not in SEED_FREE and getattr(cfg, "selection", "random") == "random":
        _, c = _craft(cfg, seed=1)
        assert not np.array_equal(a.poison_ids, c.poison_ids)


@pytest.mark.parametrize("cfg", PARAMS)
def test_store_round_trip(cfg, tmp_path):
    data, ps = _craft(cfg)
    store = ArtifactStore(tmp_path / "store")
    config = {"attack": key_dict(cfg), "seed": 0}
    key = artifact_key("poison", config)

    def build(staged):
        rows = store.stage_imageset(staged, ps.materialize(), poisoned_ids=ps.poison_ids)
        stage_target(store, staged, ps.target, ps.eps)
        return {"rows": rows}

    manifest, built = store.get_or_build(key, build, kind="poison", config=config)
    assert built and manifest["rows"] == len(data)
    got, poisoned = store.get_imageset(key)
    want = ps.materialize()
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.labels, want.labels)
    assert got.images.tobytes() == want.images.tobytes() and got.classes == want.classes
    assert np.array_equal(got.ids[poisoned], np.sort(ps.poison_ids))
    target = read_target(store, key)
    for field in dataclasses.fields(TargetSpec):  # scalars and arrays (trigger, trigger_mask, target_ids, ...)
        stored, crafted = getattr(target, field.name), getattr(ps.target, field.name)
        if isinstance(crafted, np.ndarray):
            assert isinstance(stored, np.ndarray), field.name
            assert stored.dtype == crafted.dtype and np.array_equal(stored, crafted), field.name
        else:
            assert stored == crafted, field.name
    assert json.loads(store.read_bytes(key, TARGET_JSON))["eps"] == ps.eps
