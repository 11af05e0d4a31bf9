"""Shipped reference models (issue 9): exported weights-only with their recipe, imported into a store under the
recipe's content key, found by key so that sweeps and ``train-<kind> --store`` import instead of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import make_imageset
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import EBMConfig, EBMJob, EBMTrainConfig
from puregen_dist.data.io import imageset_fingerprint
from puregen_dist.generative.checkpoints import WEIGHTS
from puregen_dist.generative.purifiers import load_ebm
from puregen_dist.pipeline import reference
from puregen_dist.pipeline.keys import model_artifact
from puregen_dist.pipeline.models import resolve_model_ref
from puregen_dist.pipeline.store import ArtifactStore


def recipe() -> EBMJob:
    return EBMJob(ebm=EBMConfig(nf=8, in_channels=3, image_size=16), train=EBMTrainConfig(epochs=1, batch_size=8,
                                                                                         bank_size=8))


@pytest.fixture
def exported(tmp_path, tiny_checkpoints):
    ckpt = tiny_checkpoints[3][0]
    out = reference.export_reference(recipe(), ckpt, tmp_path / "refs" / "ebm_tiny", data_fingerprint="abc",
                                     notes={"train_minutes": 1})
    return out


def test_export_keeps_model_tensors_and_records_the_recipe_key(exported):
    tensors = load_file(str(exported / WEIGHTS))
    assert tensors and all(name.startswith("model.") for name in tensors)
    record = json.loads((exported / reference.REFERENCE_JSON).read_text())
    assert record["key"] == model_artifact(recipe())[1] and record["kind"] == "ebm"
    assert record["data_fingerprint"] == "abc" and record["notes"] == {"train_minutes": 1}


def test_import_commits_under_the_recipe_key_once_and_loads(exported, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    key, built = reference.import_reference(exported, store)
    assert built and key == model_artifact(recipe())[1]
    assert reference.import_reference(exported, store) == (key, False)
    directory = resolve_model_ref(key, "ebm", store, "defense.ebm")
    energy, config = load_ebm(directory, "cpu")
    assert config.nf == 8
    assert store.manifest(key)["kind"] == "ebm"


def test_references_are_found_by_key(exported, monkeypatch):
    root = exported.parent
    key = model_artifact(recipe())[1]
    assert reference.shipped_references(root) == {key: exported}
    monkeypatch.setattr(reference, "REFERENCE_ROOT", root)
    assert reference.reference_for_key(key) == exported
    assert reference.reference_for_key("ebm-0000000000000000") is None


def test_a_recipe_that_no_longer_hashes_to_its_key_is_refused(exported):
    path = exported / reference.REFERENCE_JSON
    record = json.loads(path.read_text())
    record["recipe"]["train"]["epochs"] = 2
    path.write_text(json.dumps(record))
    with pytest.raises(UserInputError, match="re-export the reference"):
        reference.read_reference(exported)


def test_planner_imports_a_shipped_reference_instead_of_training(exported, monkeypatch, tmp_path):
    from puregen_dist.sweep.plan import format_plan, plan_sweep
    from puregen_dist.sweep.spec import sweep_from_dict

    monkeypatch.setattr(reference, "REFERENCE_ROOT", exported.parent)
    job = recipe()
    models = {"ebm": {"kind": "ebm", "ebm": {"nf": 8, "in_channels": 3, "image_size": 16},
                      "train": {"epochs": 1, "batch_size": 8, "bank_size": 8}}}
    sweep = sweep_from_dict({"name": "s", "models": models,
                             "base": {"defense": {"name": "puregen_ebm", "ebm": "model:ebm"}},
                             "settings": {"store": str(tmp_path / "store")}}, source="s.yaml")
    assert sweep.model_keys()["ebm"] == model_artifact(job)[1]
    plan = plan_sweep(sweep, ArtifactStore(tmp_path / "store"))
    assert plan.models[0].action == "import"
    assert "1 imported from shipped references" in format_plan(plan)


def test_imageset_fingerprint_depends_on_content_not_order():
    data = make_imageset()
    shuffled = data.take(np.random.default_rng(0).permutation(len(data)))
    assert imageset_fingerprint(shuffled) == imageset_fingerprint(data)
    changed = data.replace(images=data.images.copy())
    changed.images[0, 0, 0, 0] ^= 1
    assert imageset_fingerprint(changed) != imageset_fingerprint(data)
