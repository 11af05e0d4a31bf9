"""Imported published poisons (trigger_file, toxic, ntga): each layout written as published, imported exactly,
deterministic; bad files refused before anything is computed, pickles without running their code."""

from __future__ import annotations

import copyreg
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from published_poisons import EPS, unit_trigger, write_ntga, write_toxic, write_trigger

from conftest import make_imageset
from puregen_dist.attacks import build_attack
from puregen_dist.attacks.imports import NTGAConfig, ToxicConfig, TriggerFileConfig
from puregen_dist.attacks.safe_load import load_npy, load_pickle
from puregen_dist.config.errors import UserInputError
from puregen_dist.types import ImageSet


def shuffled_ids(data: ImageSet, seed: int = 1) -> ImageSet:
    """``data`` with its ids permuted, so id order differs from row order."""
    ids = np.random.default_rng(seed).permutation(data.ids)
    return ImageSet(data.images, data.labels, ids, data.classes)


# ------------------------------------------------------------------------------------------ trigger_file


@pytest.mark.parametrize("convention", ["symmetric", "unit"])
@pytest.mark.parametrize("layout", ["1chw", "chw", "hwc"])
def test_trigger_file_shapes_and_conventions_give_the_same_delta(tmp_path, layout, convention):
    data = make_imageset(n=64, size=8, channels=3, classes=4)
    delta = unit_trigger(data.shape)
    path = write_trigger(tmp_path / "best_noise_lab2.npy", delta, layout, convention)
    attack = build_attack(TriggerFileConfig(path=str(path), convention=convention, target_class=2, budget=0.125))
    ps = attack.craft(data, seed=0)
    np.testing.assert_allclose(ps.target.trigger, delta, atol=1e-6)
    assert ps.target.kind == "triggered" and ps.target.target_class == 2 and ps.eps == EPS
    assert ps.target.trigger.dtype == np.float32 and ps.target.trigger.shape == data.shape
    pos = data.positions(ps.poison_ids)
    assert len(pos) == 8 and np.all(data.labels[pos] == 2) and np.array_equal(ps.poison_labels, data.labels[pos])
    expected = np.clip(np.rint(np.clip(data.images[pos] / 255 + delta, 0, 1) * 255), 0, 255)
    assert np.abs(ps.poisoned.astype(int) - expected.astype(int)).max() <= 1  # float rounding at .5 only
    assert np.abs(ps.poisoned.astype(int) - data.images[pos].astype(int)).max() <= 8


def test_trigger_file_one_channel_layouts(tmp_path):
    data = make_imageset(n=32, size=8, channels=1, classes=4)
    delta = unit_trigger(data.shape)
    triggers = []
    for layout in ("1chw", "chw", "hwc", "hw"):
        path = write_trigger(tmp_path / f"{layout}.npy", delta, layout, "symmetric")
        attack = build_attack(TriggerFileConfig(path=str(path), convention="symmetric", num_poisons=2))
        triggers.append(attack.craft(data, seed=0).target.trigger)
    for trigger in triggers:
        np.testing.assert_allclose(trigger, delta, atol=1e-6)


def test_selection_last_takes_the_last_target_rows_in_id_order(tmp_path):
    data = shuffled_ids(make_imageset(n=64, classes=4))
    path = write_trigger(tmp_path / "t.npy", unit_trigger(data.shape), "1chw", "symmetric")
    cfg = TriggerFileConfig(path=str(path), convention="symmetric", target_class=1, num_poisons=5, selection="last")
    ps = build_attack(cfg).craft(data, seed=0)
    target_ids = np.sort(data.ids[data.labels == 1])
    assert sorted(ps.poison_ids.tolist()) == target_ids[-5:].tolist()
    assert np.array_equal(build_attack(cfg).craft(data, seed=7).poison_ids, ps.poison_ids)  # seed-free


def test_num_poisons_overrides_budget_and_random_selection_follows_the_seed(tmp_path):
    data = make_imageset(n=64, classes=4)
    path = write_trigger(tmp_path / "t.npy", unit_trigger(data.shape), "chw", "unit")
    by_budget = build_attack(TriggerFileConfig(path=str(path), convention="unit", budget=0.0625))
    assert len(by_budget.craft(data, seed=0).poison_ids) == 4
    cfg = TriggerFileConfig(path=str(path), convention="unit", budget=0.0625, num_poisons=11)
    first, again = build_attack(cfg).craft(data, seed=3), build_attack(cfg).craft(data, seed=3)
    assert len(first.poison_ids) == 11
    assert np.array_equal(first.poison_ids, again.poison_ids) and np.array_equal(first.poisoned, again.poisoned)
    assert not np.array_equal(build_attack(cfg).craft(data, seed=4).poison_ids, first.poison_ids)
    too_many = build_attack(TriggerFileConfig(path=str(path), convention="unit", num_poisons=17))
    with pytest.raises(UserInputError, match="attack.num_poisons: asks for 17 poisons but class 0 has only 16"):
        too_many.validate(data)


def test_trigger_above_eps_is_refused(tmp_path):
    data = make_imageset()
    delta = unit_trigger(data.shape)
    delta[1, 2, 0] = 23 / 255
    path = write_trigger(tmp_path / "t.npy", delta, "1chw", "symmetric")
    with pytest.raises(UserInputError, match=r"attack.path: .*23.0/255 in pixel units \(convention symmetric\) "
                                             r"> eps 8/255 \+ 1/255"):
        build_attack(TriggerFileConfig(path=str(path), convention="symmetric")).validate(data)
    # the same file read as unit-convention is twice as large: still refused; a 16/255 budget accepts it halved
    with pytest.raises(UserInputError, match="46.0/255"):
        build_attack(TriggerFileConfig(path=str(path), convention="unit")).validate(data)
    build_attack(TriggerFileConfig(path=str(path), convention="symmetric", eps=23 / 255)).validate(data)


def test_trigger_file_bad_inputs_are_refused(tmp_path):
    data = make_imageset(size=8, channels=3)
    wrong = write_trigger(tmp_path / "wrong.npy", unit_trigger((16, 16, 3)), "1chw", "unit")
    with pytest.raises(UserInputError, match=r"trigger of shape \(1, 3, 16, 16\) does not fit .* \(8, 8, 3\)"):
        build_attack(TriggerFileConfig(path=str(wrong), convention="unit")).validate(data)
    with pytest.raises(UserInputError, match="attack.path: file not found: .*missing.npy"):
        build_attack(TriggerFileConfig(path=str(tmp_path / "missing.npy"), convention="unit")).validate(data)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((8, 8, 3), np.int64))
    with pytest.raises(UserInputError, match="expected a float trigger"):
        build_attack(TriggerFileConfig(path=str(ints), convention="unit")).validate(data)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserInputError, match="not a numeric .npy array without pickled objects"):
        load_npy(objects, "attack.path")
    path = write_trigger(tmp_path / "ok.npy", unit_trigger(data.shape), "hwc", "unit")
    with pytest.raises(UserInputError, match="attack.target_class: 9 is not a class"):
        build_attack(TriggerFileConfig(path=str(path), convention="unit", target_class=9)).validate(data)


# ------------------------------------------------------------------------------------------------ toxic


def class_ids(data: ImageSet, label: int, count: int) -> np.ndarray:
    return data.ids[data.labels == label][:count]


@pytest.mark.parametrize("as_pil", [True, False])
def test_toxic_layout_imports_the_poisons_at_their_base_rows(tmp_path, as_pil):
    data = shuffled_ids(make_imageset(n=64, classes=4))
    base = class_ids(data, 1, 6)
    poisons = write_toxic(tmp_path / "trial0", data, base, as_pil=as_pil)
    attack = build_attack(ToxicConfig(path=str(tmp_path / "trial0")))
    ps = attack.craft(data, seed=0)
    assert np.array_equal(ps.poison_ids, base) and np.array_equal(ps.poisoned, poisons)
    assert np.array_equal(ps.poison_labels, np.full(6, 1)) and ps.eps == EPS
    t = ps.target
    assert t.kind == "triggerless" and t.adversarial_label == 1 and t.target_class is None
    assert t.target_images.shape == (1, *data.shape) and t.target_images.dtype == np.uint8
    assert t.target_labels.tolist() == [3] and t.target_labels.dtype == np.int64
    again = build_attack(ToxicConfig(path=str(tmp_path / "trial0"))).craft(data, seed=5)
    assert np.array_equal(again.poisoned, ps.poisoned) and np.array_equal(again.poison_ids, ps.poison_ids)
    out = ps.materialize()
    assert np.array_equal(out.images[data.positions(base)], poisons)


def test_toxic_base_indices_as_positions(tmp_path):
    data = shuffled_ids(make_imageset(n=64, classes=4, channels=1))
    base = class_ids(data, 2, 4)
    poisons = write_toxic(tmp_path / "t", data, base, index="position")
    with pytest.raises(UserInputError, match="attack.path: base_indices.pickle row 0: id .* is not in the training"):
        build_attack(ToxicConfig(path=str(tmp_path / "t"))).validate(data)  # positions read as ids
    ps = build_attack(ToxicConfig(path=str(tmp_path / "t"), index="position")).craft(data, seed=0)
    assert np.array_equal(ps.poison_ids, base) and np.array_equal(ps.poisoned, poisons)


def test_toxic_poison_beyond_eps_is_refused_naming_the_worst(tmp_path):
    data = make_imageset(n=64, classes=4)
    base = class_ids(data, 0, 10)
    write_toxic(tmp_path / "t", data, base)
    with open(tmp_path / "t" / "poisons.pickle", "rb") as f:
        pairs = pickle.load(f)
    bumped = np.asarray(pairs[7][0]).copy()
    base_image = data.images[data.positions(base[7:8])][0]
    bumped[0, 0, 0] = base_image[0, 0, 0] + 23 if base_image[0, 0, 0] < 200 else base_image[0, 0, 0] - 23
    bumped[0, 1, 0] = np.clip(int(base_image[0, 1, 0]) + 12, 0, 255)  # a second, smaller excess elsewhere
    pairs[7] = (Image.fromarray(bumped, "RGB"), pairs[7][1])
    with open(tmp_path / "t" / "poisons.pickle", "wb") as f:
        pickle.dump(pairs, f)
    with pytest.raises(UserInputError, match=rf"attack.path: poison 7 \(id {base[7]}\) differs from its base image "
                                             r"by 23/255 > eps 8/255 \+ 1/255"):
        build_attack(ToxicConfig(path=str(tmp_path / "t"))).validate(data)
    build_attack(ToxicConfig(path=str(tmp_path / "t"), eps=22 / 255)).validate(data)  # 23 <= 22 + 1


class Payload:
    """Pickles as a call to ``func(arg)``: what a hostile poisons.pickle carries."""

    def __init__(self, func, arg: str) -> None:  # noqa: ANN001
        self.func, self.arg = func, arg

    def __reduce__(self):  # noqa: ANN204
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, eval])
def test_toxic_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path, func):
    data = make_imageset(n=64, classes=4)
    base = class_ids(data, 0, 2)
    write_toxic(tmp_path / "t", data, base)
    marker = tmp_path / "pwned"
    command = f"echo pwned > {marker}" if func is os.system else f"open({str(marker)!r}, 'w').write('pwned')"
    with open(tmp_path / "t" / "poisons.pickle", "wb") as f:
        pickle.dump([(Payload(func, command), 0), (Payload(func, command), 0)], f)
    name = "posix.system" if func is os.system else "builtins.eval"
    with pytest.raises(UserInputError, match=rf"poisons.pickle: refuses to load {name}: only arrays, images, "
                                             "numbers, strings, lists and tuples are accepted"):
        build_attack(ToxicConfig(path=str(tmp_path / "t"))).validate(data)
    assert not marker.exists()


def test_a_pickle_cannot_make_pil_open_a_file_it_names(tmp_path):
    """``copyreg._reconstructor(PngImageFile, PngImageFile, path)`` would run the plugin's constructor on any
    path (and decode it); only ``base is object`` rebuilds are accepted, plugin classes become plain images."""
    from PIL import PngImagePlugin

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "secret.png")

    class OpensAFile:
        def __reduce__(self):  # noqa: ANN204
            return (copyreg._reconstructor, (PngImagePlugin.PngImageFile, PngImagePlugin.PngImageFile,
                                             str(tmp_path / "secret.png")))

    (tmp_path / "poisons.pickle").write_bytes(pickle.dumps([(OpensAFile(), 0)], protocol=2))
    with pytest.raises(UserInputError, match=r"poisons.pickle: refuses to rebuild Image through Image"):
        load_pickle(tmp_path / "poisons.pickle", "attack.path")
    (tmp_path / "junk.pickle").write_bytes(b"\x80\x04\x95garbage")
    with pytest.raises(UserInputError, match=r"junk.pickle: not a readable pickle"):
        load_pickle(tmp_path / "junk.pickle", "attack.path")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_loads_what_the_published_pickles_hold(tmp_path, protocol):
    rgb = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as png:
        png.load()
        obj = [(Image.fromarray(rgb), 1), (png, np.int64(2)), (rgb.astype(np.float32) / 255, 3),
               {"indices": np.arange(3), "name": "trial", "blob": b"\x00\x01", "z": 1j}]
        path = tmp_path / "obj.pickle"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    loaded = load_pickle(path, "attack.path")
    assert np.array_equal(np.asarray(loaded[0][0]), rgb) and np.array_equal(np.asarray(loaded[1][0]), rgb)
    assert loaded[1][1] == 2 and np.array_equal(loaded[2][0], rgb.astype(np.float32) / 255)
    assert loaded[3]["blob"] == b"\x00\x01" and loaded[3]["indices"].tolist() == [0, 1, 2]


def test_toxic_bad_trials_are_refused(tmp_path):
    data = make_imageset(n=64, classes=4)
    base = class_ids(data, 0, 4)

    def refused(match: str, **write) -> None:
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        write_toxic(root, write.pop("data", data), write.pop("base", base), **write)
        with pytest.raises(UserInputError, match=match):
            build_attack(ToxicConfig(path=str(root))).validate(data)

    refused(r"attack.path: poisons.pickle row 2: label 3 differs from its base image's label 0 \(id \d+\); "
            "imported poisons must be clean-label", labels=np.array([0, 0, 3, 0]))
    refused("poisons.pickle row 1: label 7 is not a class", labels=np.array([0, 7, 0, 0]))
    refused(r"poisons span classes \[0, 1\]", base=np.concatenate([base[:2], class_ids(data, 1, 2)]))
    refused(r"base_indices.pickle lists index \d+ twice", base=np.array([base[0], base[1], base[0], base[2]]))
    small = make_imageset(n=64, size=4, classes=4)
    refused(r"poisons.pickle row 0: image of shape \(4, 4, 3\) does not match the dataset's \(H, W, C\) = "
            r"\(8, 8, 3\)", data=small)
    refused("PIL image of mode 'L'; the dataset's 3-channel images need mode 'RGB'",
            data=make_imageset(n=64, channels=1, classes=4))
    root = tmp_path / "missing_target"
    write_toxic(root, data, base)
    (root / "target.pickle").unlink()
    with pytest.raises(UserInputError, match="target.pickle not found"):
        build_attack(ToxicConfig(path=str(root))).validate(data)
    with pytest.raises(UserInputError, match="attack.path: directory not found"):
        build_attack(ToxicConfig(path=str(tmp_path / "nowhere"))).validate(data)
    pos_root = tmp_path / "positions"
    write_toxic(pos_root, data, base, index="position")
    with open(pos_root / "base_indices.pickle", "wb") as f:
        pickle.dump([0, 4, 8, 64], f)
    with pytest.raises(UserInputError, match=r"row 3: position 64 is outside the training set \(0..63\)"):
        build_attack(ToxicConfig(path=str(pos_root), index="position")).validate(data)


# ------------------------------------------------------------------------------------------------- ntga


def ntga_cfg(root: Path, **changes) -> NTGAConfig:
    return NTGAConfig(images=str(root / "x_train.npy"), labels=str(root / "y_train.npy"), **changes)


def test_ntga_layout_poisons_every_row(tmp_path):
    data = shuffled_ids(make_imageset(n=48, classes=4))
    poisoned = write_ntga(tmp_path, data)
    ps = build_attack(ntga_cfg(tmp_path)).craft(data, seed=0)
    assert np.array_equal(ps.poison_ids, data.ids) and np.array_equal(ps.poisoned, poisoned)
    assert np.array_equal(ps.poison_labels, data.labels) and ps.eps == EPS and ps.budget == 1.0
    assert ps.target.kind == "availability" and ps.target.trigger is None and ps.target.target_class is None
    again = build_attack(ntga_cfg(tmp_path)).craft(data, seed=1)
    assert np.array_equal(again.poisoned, ps.poisoned)


def test_ntga_bad_releases_are_refused(tmp_path):
    data = make_imageset(n=48, classes=4)
    write_ntga(tmp_path / "short", make_imageset(n=40, classes=4))
    with pytest.raises(UserInputError, match=r"attack.images: .* shape \(40, 8, 8, 3\) does not match the training "
                                             r"set's \(N, H, W, C\) = \(48, 8, 8, 3\)"):
        build_attack(ntga_cfg(tmp_path / "short")).validate(data)
    labels = data.labels.copy()
    labels[5] = (labels[5] + 1) % 4
    write_ntga(tmp_path / "relabelled", data, labels=labels)
    with pytest.raises(UserInputError, match=r"attack.labels: row 5: label 2 differs from the training label 1 "
                                             r"\(id 105\); imported poisons must be clean-label"):
        build_attack(ntga_cfg(tmp_path / "relabelled")).validate(data)
    write_ntga(tmp_path / "loud", data, shift=16)
    with pytest.raises(UserInputError, match=r"attack.images: poison \d+ \(id \d+\) differs from its base image by "
                                             r"1[0-6]/255 > eps 8/255 \+ 1/255"):
        build_attack(ntga_cfg(tmp_path / "loud")).validate(data)
    with pytest.raises(UserInputError, match="attack.labels: file not found"):
        build_attack(NTGAConfig(images=str(tmp_path / "loud" / "x_train.npy"),
                                labels=str(tmp_path / "nope.npy"))).validate(data)


# ------------------------------------------------------------------------------------------ content keys


def test_poison_key_follows_the_imported_files_content(tmp_path):
    from puregen_dist.config.generative import PurifyJob
    from puregen_dist.config.loading import build
    from puregen_dist.pipeline.stages import poison_artifact

    data = make_imageset()
    path = write_trigger(tmp_path / "t.npy", unit_trigger(data.shape), "1chw", "symmetric")
    job = build(PurifyJob, {"attack": {"name": "trigger_file", "path": str(path), "convention": "symmetric"}},
                source="test")
    key, config = poison_artifact(job)
    assert set(config["files"]) == {"path"} and poison_artifact(job)[0] == key
    write_trigger(path, unit_trigger(data.shape, seed=1), "1chw", "symmetric")  # replaced in place
    assert poison_artifact(job)[0] != key
