"""Artifact keys of the shipped recipes are pinned: a refactor of how keys are computed must not invalidate
existing stores (issue 8). Keys are computed from configs only (nothing is built)."""

from __future__ import annotations

import pytest

from puregen_dist.pipeline.store import ArtifactStore
from puregen_dist.sweep.plan import plan_sweep
from puregen_dist.sweep.spec import load_sweep


@pytest.fixture(scope="module")
def quickstart_plan(tmp_path_factory):
    sweep = load_sweep("sweeps/quickstart.yaml")
    return sweep, plan_sweep(sweep, ArtifactStore(str(tmp_path_factory.mktemp("store"))))


def test_quickstart_model_keys_are_pinned(quickstart_plan):
    sweep, _ = quickstart_plan
    assert sweep.model_keys() == {"ebm": "ebm-9c82639b93ba71ef", "ddpm": "ddpm-9a85f456b8a96105",
                                  "surrogate": "surrogate-d29d2529740f725e"}


def test_quickstart_poison_and_purified_keys_are_pinned(quickstart_plan):
    """Re-pinned once, deliberately, in issue 10: the quickstart's additive trigger was renamed ``blend`` ->
    ``sign`` (``blend`` is now Chen et al.'s alpha-blend), which changes its value and so its keys. Cell ids were
    re-pinned once more in issue 11, when they stopped hashing key-neutral fields at their default (so adding
    such an option, as ``classifier.dropout``, never renames cells again); artifact keys did not change.
    Re-pinned in issue 15: PureGen's purified sets carry the version of the noise scheme (per-sample CPU
    generators -> counter-based Philox on the device changed every purified image); JPEG's key did not change."""
    _, plan = quickstart_plan
    by_row = {(t.cell.row, t.cell.config.seed): t for t in plan.trials if t.cell.col == "badnets"}
    ebm = by_row[("puregen_ebm", 0)]
    assert (ebm.cell.cell_id, ebm.poison_key, ebm.train_key) == (
        "cell-4422d279d7be65d3", "poison-1df535d87074ae4b", "purified-6ff4dd3fe2a50d8b")
    assert ebm.model_keys == {"ebm": "ebm-9c82639b93ba71ef"}
    assert by_row[("jpeg", 0)].train_key == "purified-4067270d78c2ccb6"
    assert by_row[("puregen_ddpm", 0)].train_key == "purified-57191353cfa271eb"
    assert by_row[("none", 0)].train_key == "poison-1df535d87074ae4b"


def test_transfer_recipe_classifier_key_is_pinned(tmp_path):
    sweep = load_sweep("sweeps/transfer_linear.yaml")
    assert sweep.model_keys() == {"pretrained": "classifier-d112b509199e4b51", "ebm": "ebm-c409615b36affe1c",
                                  "ddpm": "ddpm-f1f224735f30a6cb"}
    plan = plan_sweep(sweep, ArtifactStore(str(tmp_path)))
    first = plan.trials[0]
    assert (first.cell.cell_id, first.poison_key) == ("cell-4cc06557e67c4476", "poison-912a3595f76049d9")
    assert first.model_keys == {"classifier": "classifier-d112b509199e4b51"}
