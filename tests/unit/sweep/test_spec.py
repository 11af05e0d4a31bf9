"""Sweep files: axes (grid, range, choice), conditional axes, seed/target axes, model references, labels,
deduplication and clear errors."""

from __future__ import annotations

import pytest

from puregen_dist.config.errors import ConfigError
from puregen_dist.sweep.spec import get_dotted, set_dotted, sweep_from_dict

BASE = {"data": {"dataset": "digits", "train_per_class": 5},
        "attack": {"name": "badnets", "target_class": 0, "budget": 0.1},
        "classifier": {"name": "small_cnn", "epochs": 1}}
TINY_EBM = {"kind": "ebm", "ebm": {"nf": 8, "in_channels": 1, "image_size": 16},
            "train": {"epochs": 1, "batch_size": 10, "bank_size": 20, "mcmc_steps": 2}}


def _sweep(space=None, settings=None, models=None, base=BASE):
    data = {"name": "t", "base": base, "space": space or {}, "settings": settings or {}}
    if models:
        data["models"] = models
    return sweep_from_dict(data, source="sweep.yaml")


def test_grid_cross_product_with_settings_axes():
    sweep = _sweep({"classifier.name": ["small_cnn", "resnet18"],
                    "defense": {"grid": [{"name": "none"}, {"name": "jpeg", "quality": 50}]}},
                   {"seeds": [0, 1], "targets": [0, 3]})
    assert len(sweep.cells) == 2 * 2 * 2 * 2
    first = sweep.cells[0].config
    assert first.name == "t" and first.tracking.experiment == "t"  # the sweep names the MLflow experiment
    assert {(c.config.seed, c.config.attack.target_class) for c in sweep.cells} == {(0, 0), (0, 3), (1, 0), (1, 3)}
    assert {c.row for c in sweep.cells} == {"none", "jpeg"} and {c.col for c in sweep.cells} == {"badnets"}
    assert [c.index for c in sweep.cells] == list(range(16))


def test_conditional_axis_expands_only_matching_cells():
    sweep = _sweep({"defense": {"grid": [{"name": "none"}, {"name": "jpeg"}]},
                    "defense.quality": {"range": [25, 75, 25], "when": {"defense.name": "jpeg"}}})
    assert [(c.config.defense.name, getattr(c.config.defense, "quality", None)) for c in sweep.cells] == [
        ("none", None), ("jpeg", 25), ("jpeg", 50), ("jpeg", 75)]
    assert [c.row for c in sweep.cells] == ["none", "jpeg (quality=25)", "jpeg (quality=50)", "jpeg (quality=75)"]


def test_a_list_of_spaces_is_the_union_of_their_cells():
    """Some defenses crossed with every attack, others with one: two spaces; shared cells appear once."""
    attacks = [{"name": "none"}, {"name": "badnets", "budget": 0.1}, {"name": "badnets", "budget": 0.2}]
    sweep = _sweep([{"attack": {"grid": attacks}, "defense": {"grid": [{"name": "none"}, {"name": "jpeg"}]}},
                    {"attack": {"grid": attacks[:2]}, "defense": [{"name": "none"}, {"name": "jpeg", "quality": 25}]}],
                   {"seeds": [0, 1]})
    cells = [(c.config.defense.name, getattr(c.config.defense, "quality", None), c.config.attack.name,
              getattr(c.config.attack, "budget", None)) for c in sweep.cells if c.config.seed == 0]
    assert cells == [("none", None, "none", None), ("jpeg", 75, "none", None), ("none", None, "badnets", 0.1),
                     ("jpeg", 75, "badnets", 0.1), ("none", None, "badnets", 0.2), ("jpeg", 75, "badnets", 0.2),
                     ("jpeg", 25, "none", None), ("jpeg", 25, "badnets", 0.1)]  # (none, ...) of space 2: merged
    assert len(sweep.cells) == 2 * 8 and [c.index for c in sweep.cells] == list(range(16))
    assert {c.row for c in sweep.cells} == {"none", "jpeg (quality=75)", "jpeg (quality=25)"}
    assert len(sweep.axes) == 4
    with pytest.raises(ConfigError, match=r"space\[1\]\.defense: expected a list or a mapping"):
        _sweep([{"defense": [{"name": "none"}]}, {"defense": 3}])
    with pytest.raises(ConfigError, match="space: an empty list"):
        sweep_from_dict({"name": "t", "base": BASE, "space": []}, source="sweep.yaml")


def test_target_axis_skips_attacks_without_a_target_class():
    sweep = _sweep({"attack": {"grid": [{"name": "none"}, {"name": "badnets", "budget": 0.1}]}},
                   {"targets": [1, 2]})
    assert [(c.config.attack.name, getattr(c.config.attack, "target_class", None)) for c in sweep.cells] == [
        ("none", None), ("badnets", 1), ("badnets", 2)]
    assert {c.col for c in sweep.cells} == {"none", "badnets"}  # target classes are aggregated, not labelled


def test_trials_axis_draws_poison_keys_for_triggerless_attacks_only():
    classifier = {"kind": "classifier", "data": {"dataset": "digits", "train_per_class": 5},
                  "classifier": {"name": "small_cnn", "epochs": 1}}
    sweep = _sweep({"attack": {"grid": [{"name": "none"}, {"name": "gradient_matching",
                                                            "surrogate": "model:clean"}]}},
                   {"trials": 3, "targets": [1, 2]}, models={"clean": classifier})
    assert [(c.config.attack.name, getattr(c.config.attack, "poison_key", None)) for c in sweep.cells] == [
        ("none", None), ("gradient_matching", 0), ("gradient_matching", 1), ("gradient_matching", 2)]
    assert {c.col for c in sweep.cells} == {"none", "gradient_matching"}  # trials are aggregated, not labelled
    assert "poison_key=2" in sweep.cells[-1].describe()
    bullseye = _sweep({"attack": {"grid": [{"name": "bullseye_polytope",
                                             "substitutes": ["model:clean", "model:clean"]}]}},
                      {"trials": 2}, models={"clean": classifier})
    key = sweep.model_keys()["clean"]
    assert [c.config.attack.substitutes for c in bullseye.cells] == [(key, key)] * 2  # each reference resolved
    from puregen_dist.sweep.plan import used_models
    assert used_models(bullseye.cells[0].config) == {"attack.substitutes.0": key, "attack.substitutes.1": key}
    with pytest.raises(ConfigError, match="trials"):
        _sweep(settings={"trials": -1})


def test_choice_is_seeded_and_duplicates_merge():
    space = {"defense": {"grid": [{"name": "jpeg"}]},
             "defense.quality": {"choice": [10, 20, 30, 40, 50], "samples": 3, "seed": 7}}
    one, two = _sweep(space), _sweep(space)
    assert [c.config.defense.quality for c in one.cells] == [c.config.defense.quality for c in two.cells]
    assert len({c.config.defense.quality for c in one.cells}) == 3
    same = _sweep({"seed": [0, 0, 1]})
    assert [c.config.seed for c in same.cells] == [0, 1]
    assert len({c.cell_id for c in same.cells}) == 2 and same.cells[0].cell_id.startswith("cell-")


def test_model_references_become_artifact_keys():
    sweep = _sweep({"defense": {"grid": [{"name": "puregen_ebm", "ebm": "model:small"}]}},
                   models={"small": TINY_EBM, "large": {**TINY_EBM, "ebm": {**TINY_EBM["ebm"], "nf": 16}}})
    keys = sweep.model_keys()
    assert sweep.cells[0].config.defense.ebm == keys["small"] and keys["small"] != keys["large"]
    shift = _sweep({"defense": {"grid": [{"name": "puregen_ebm", "ebm": "model:small"},
                                         {"name": "puregen_ebm", "ebm": "model:large"}]}},
                   models={"small": TINY_EBM, "large": {**TINY_EBM, "ebm": {**TINY_EBM["ebm"], "nf": 16}}})
    assert [c.row for c in shift.cells] == ["puregen_ebm (ebm=small)", "puregen_ebm (ebm=large)"]


def test_a_model_entry_can_name_a_recipe_file_and_override_it(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = {"name": "ebm-recipe", "output": "outputs/x", "tracking": {"experiment": "e"},
              "ebm": TINY_EBM["ebm"], "train": TINY_EBM["train"]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    space = {"defense": {"grid": [{"name": "puregen_ebm", "ebm": "model:m"}]}}
    inline = _sweep(space, models={"m": TINY_EBM})
    named = _sweep(space, models={"m": {"kind": "ebm", "recipe": "recipe.yaml"}})
    assert named.model_keys() == inline.model_keys()  # the recipe's name/output/tracking do not enter the key
    longer = _sweep(space, models={"m": {"kind": "ebm", "recipe": "recipe.yaml", "train": {"epochs": 2}}})
    assert longer.models["m"].train.epochs == 2 and longer.models["m"].train.mcmc_steps == 2
    assert longer.model_keys() != inline.model_keys()
    with pytest.raises(ConfigError, match=r"models.m.recipe: .*missing.yaml: config file not found"):
        _sweep(space, models={"m": {"kind": "ebm", "recipe": "missing.yaml"}})


def test_the_planner_skips_models_that_no_cell_references(tmp_path):
    from puregen_dist.pipeline.store import ArtifactStore
    from puregen_dist.sweep.plan import plan_sweep

    sweep = _sweep({"defense": {"grid": [{"name": "puregen_ebm", "ebm": "model:small"}]}},
                   models={"small": TINY_EBM, "large": {**TINY_EBM, "ebm": {**TINY_EBM["ebm"], "nf": 16}}})
    plan = plan_sweep(sweep, ArtifactStore(str(tmp_path)))
    assert [m.key for m in plan.models] == [sweep.model_keys()["small"]]


@pytest.mark.parametrize("data, message", [
    ({"name": "t", "bogus": 1}, "unknown key 'bogus'"),
    ({"base": {}}, "name: required"),
    ({"name": "t", "space": {"seed": {"grid": [0], "range": [0, 1, 1]}}}, "space.seed: expected exactly one"),
    ({"name": "t", "space": {"seed": {"range": [5, 1, 1]}}}, r"space.seed.range: expected \[start, stop, step\]"),
    ({"name": "t", "space": {"classifier.epochs": [-1]}}, r"cell \(classifier.epochs=-1\).*classifier.epochs"),
    ({"name": "t", "space": {"defense": [{"name": "puregen_ebm", "ebm": "model:nope"}]}},
     "defense.ebm: 'model:nope' names no entry of `models:`"),
    ({"name": "t", "models": {"m": {"kind": "gan"}}}, "models.m.kind: expected one of ebm, ddpm, classifier"),
    ({"name": "t", "settings": {"trial_cpus": 0}}, "settings.trial_cpus: must be > 0"),
])
def test_bad_sweep_files_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_dict(data, source="sweep.yaml")


def test_dotted_helpers():
    data = {"a": {"b": 1}}
    assert get_dotted(data, "a.b") == 1 and get_dotted(data, "a.c", "x") == "x"
    assert set_dotted(data, "a.c.d", 2) == {"a": {"b": 1, "c": {"d": 2}}} and data == {"a": {"b": 1}}


def test_overrides_of_dotted_axes_replace_them():
    from puregen_dist.config.loading import deep_merge, parse_overrides

    data = {"name": "t", "base": BASE, "space": {"classifier.name": ["small_cnn", "resnet18"]}}
    data = deep_merge(data, parse_overrides(["space.classifier.name=[hlb_small]", "space.seed=[3]"]))
    sweep = sweep_from_dict(data, source="sweep.yaml")
    assert [(c.config.classifier.name, c.config.seed) for c in sweep.cells] == [("hlb_small", 3)]


def test_cli_show_config_and_bad_sweep_file(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    from puregen_dist.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "t", "base": BASE, "space": {"seed": [0, 1, 2]}}))
    assert main(["show-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# sweep 't': 3 cells") and out.count("cell-") == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "t", "base": BASE, "space": {"classifier.epochs": [0]}}))
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "cell (classifier.epochs=0): classifier.epochs: must be >= 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "good.yaml"]  # nothing written
