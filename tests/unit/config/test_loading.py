from __future__ import annotations

from pathlib import Path

import pytest

from puregen_dist.attacks.badnets import BadNetsConfig
from puregen_dist.config import ConfigError, ExperimentConfig, flatten, load_experiment, to_yaml
from puregen_dist.config.loading import experiment_from_dict, parse_overrides, yaml_load
from puregen_dist.defenses.jpeg import JPEGConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_recipe(tmp_path):
    cfg = load_experiment(write(tmp_path, "{}\n"))  # an explicit empty mapping: every default
    assert cfg == ExperimentConfig()
    assert (cfg.classifier.lr, cfg.classifier.momentum, cfg.classifier.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.classifier.milestones == (100, 150) and cfg.classifier.epochs == 200
    assert cfg.attack.name == "none" and cfg.defense.name == "none"


def test_registry_sections_build_their_own_config_class(tmp_path):
    cfg = load_experiment(write(tmp_path, "attack: {name: badnets, budget: 0.2}\ndefense: {name: jpeg, quality: 25}\n"))
    assert isinstance(cfg.attack, BadNetsConfig) and cfg.attack.budget == 0.2
    assert isinstance(cfg.defense, JPEGConfig) and cfg.defense.quality == 25


def test_overrides_are_typed_and_win(tmp_path):
    path = write(tmp_path, "classifier: {epochs: 3}\n")
    cfg = load_experiment(path, ["classifier.epochs=7", "classifier.milestones=[2,5]", "attack.name=badnets",
                                 "attack.eps=0.05"])
    assert cfg.classifier.epochs == 7 and cfg.classifier.milestones == (2, 5)
    assert cfg.attack.eps == pytest.approx(0.05)


def test_changing_a_registry_name_drops_the_old_entrys_fields(tmp_path):
    path = write(tmp_path, "defense: {name: jpeg, quality: 25}\n")
    cfg = load_experiment(path, ["defense.name=none"])
    assert cfg.defense.name == "none"


def test_roundtrip_through_yaml_and_flatten(tmp_path):
    cfg = load_experiment(write(tmp_path, "attack: {name: badnets}\nclassifier: {milestones: [3]}\n"))
    again = load_experiment(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["attack.name"] == "badnets" and flat["classifier.milestones"] == "3"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


@pytest.mark.parametrize(
    ("text", "overrides", "needles"),
    [
        ("classifier: {epochs: 3\n", [], ["malformed YAML", "line"]),
        ("classifer: {epochs: 3}\n", [], ["unknown key 'classifer'", "valid keys"]),
        ("classifier: {epocs: 3}\n", [], ["classifier.epocs"]),
        ("classifier: {epochs: three}\n", [], ["classifier.epochs", "expected an integer"]),
        ("classifier: {epochs: -1}\n", [], ["classifier.epochs", ">= 1"]),
        ("attack: {name: badnets, eps: 1.5}\n", [], ["attack.eps", "(0, 1]"]),
        ("attack: {name: badnets, budget: 2}\n", [], ["attack.budget", "(0, 1]"]),
        ("attack: {name: narcisus}\n", [], ["attack.name", "narcisus", "valid names", "badnets"]),
        ("defense: {name: jpeg, quality: 0}\n", [], ["defense.quality"]),
        ("data: {dataset: cifar10}\n", [], ["data.root", "required"]),
        ("classifier: {flip: yes please}\n", [], ["classifier.flip", "true or false"]),
        ("{}\n", ["classifier.epochs=0"], ["classifier.epochs"]),
        ("{}\n", ["nonsense"], ["dotted.key=value"]),
        ("", [], ["empty config"]),
        ("# only a comment\n", ["seed=1"], ["empty config"]),
        ("seed: 1\nseed: 2\n", [], ["duplicate key 'seed'", "line 2", "first at line 1"]),
        ("classifier: {lr: .inf}\n", [], ["classifier.lr", "finite"]),
        ("eval: {magnifications: [1, .nan]}\n", [], ["eval.magnifications[1]", "finite"]),
        ("{}\n", ["classifier.weight_decay=-.inf"], ["classifier.weight_decay", "finite"]),
        ("{}\n", ["seed=4294967296"], ["seed", "out of range"]),
        ("{}\n", ["data.subset_seed=-1"], ["data.subset_seed", "out of range"]),
        ("{}\n", ["classifier.epochs=99999999999999999999"], ["classifier.epochs", "out of range"]),
        ("{}\n", ["classifier.eval_batch_size=1000000000000"], ["classifier.eval_batch_size", "too large"]),
        ("{}\n", ["data.image_size=1000000000"], ["data.image_size", "too large"]),
        ("{}\n", ["classifier.device=banana"], ["classifier.device", "banana"]),
        ("{}\n", ["tracking.uri=gopher://x"], ["tracking.uri", "gopher"]),
        ("{}\n", ["tracking.experiment=' '"], ["tracking.experiment", "empty"]),
        ("{}\n", ["name=../../escape"], ["name", "path traversal"]),
        ("- a\n- b\n", [], ["mapping"]),
    ],
)
def test_bad_input_names_the_file_and_key(tmp_path, text, overrides, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    message = str(info.value)
    assert str(path) in message or "--set" in message
    for needle in needles:
        assert needle in message, message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "absent.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_experiment_from_dict_is_strict():
    with pytest.raises(ConfigError, match="seed"):
        experiment_from_dict({"seed": "zero"})


def test_yaml_1_2_floats_and_merge_keys(tmp_path):
    cfg = load_experiment(write(tmp_path, "classifier: {lr: 1e-2, weight_decay: 5E-4}\neval: {magnifications: [2e0]}\n"))
    assert cfg.classifier.lr == 0.01 and cfg.classifier.weight_decay == 5e-4 and cfg.eval.magnifications == (2.0,)
    assert parse_overrides(["classifier.lr=1e-3"]) == {"classifier": {"lr": 0.001}}
    merged = yaml_load("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n")  # a merge key's keys may be overridden
    assert merged == {"a": {"p": 1, "q": 2}, "b": {"p": 1, "q": 3}}


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at line 2\)") as info:
        load_experiment(path)
    assert str(path) in str(info.value)
