from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_imageset
from puregen_dist.attacks.badnets import BadNetsAttack, BadNetsConfig
from puregen_dist.attacks.triggers import apply_trigger
from puregen_dist.config.errors import UserInputError


def craft(seed=0, data=None, **kw):
    data = data if data is not None else make_imageset(n=80, size=8, classes=4)
    return data, BadNetsAttack(BadNetsConfig(**kw)).craft(data, seed=seed)


def test_dirty_label_relabels_other_class_images_to_the_target():
    data, ps = craft(target_class=2, budget=0.25)
    assert len(ps.poison_ids) == 20 and ps.budget == pytest.approx(0.25)
    pos = data.positions(ps.poison_ids)
    assert np.all(data.labels[pos] != 2) and np.all(ps.poison_labels == 2)
    out = ps.materialize()
    assert np.array_equal(out.ids, data.ids) and np.all(out.labels[pos] == 2)
    untouched = np.setdiff1d(np.arange(len(data)), pos)
    assert np.array_equal(out.images[untouched], data.images[untouched])


def test_clean_label_keeps_labels_and_uses_target_class_only():
    data, ps = craft(target_class=1, budget=0.1, label_mode="clean")
    pos = data.positions(ps.poison_ids)
    assert np.all(data.labels[pos] == 1) and np.all(ps.poison_labels == 1)


def test_patch_overwrites_the_corner_only():
    data, ps = craft(patch_size=3, patch_location="bottom_right", pattern="white")
    pos = data.positions(ps.poison_ids)
    assert np.all(ps.poisoned[:, -3:, -3:, :] == 255)
    assert np.array_equal(ps.poisoned[:, :5, :, :], data.images[pos][:, :5, :, :])


def test_sign_respects_the_linf_bound():
    data, ps = craft(trigger="sign", eps=8 / 255, budget=0.5)
    pos = data.positions(ps.poison_ids)
    diff = np.abs(ps.poisoned.astype(int) - data.images[pos].astype(int))
    assert diff.max() <= 8 and diff.max() >= 7  # rounding to uint8 keeps the 8/255 bound
    assert ps.eps == pytest.approx(8 / 255)


def test_seeded_and_seed_sensitive():
    _, a = craft(seed=3)
    _, b = craft(seed=3)
    _, c = craft(seed=4)
    assert np.array_equal(a.poison_ids, b.poison_ids) and np.array_equal(a.poisoned, b.poisoned)
    assert not np.array_equal(a.poison_ids, c.poison_ids)


def test_sign_is_byte_identical_to_the_former_blend_trigger():
    """Golden values computed once with the code before the rename, where ``trigger="blend"`` was this
    additive sign pattern (same config, same seeds)."""
    data, ps = craft(seed=5, trigger="sign", eps=8 / 255, budget=0.25, target_class=1)
    assert ps.poison_ids.tolist() == [100, 103, 110, 111, 118, 119, 126, 128, 130, 131, 136, 139, 140, 144,
                                      147, 163, 174, 175, 176, 179]
    assert int(ps.poisoned.astype(np.int64).sum()) == 495090
    assert ps.poisoned[0, 0, 0].tolist() == [103, 122, 202]
    assert ps.poisoned[3, 7, 5].tolist() == [67, 124, 123]
    assert ps.poisoned[-1, 4, 2].tolist() == [99, 241, 120]
    assert hashlib.sha256(ps.poisoned.tobytes()).hexdigest() == (
        "01232e82fadb31782dcf02bbc267e38ff3b2511d702c4d1fcf11cfe8a46da4a7")
    assert ps.eps == pytest.approx(8 / 255)


def test_alpha_blend_mixes_the_pattern_into_poisoned_rows_only():
    data, ps = craft(seed=1, trigger="blend", alpha=0.2, budget=0.25)
    pattern, mask = ps.target.trigger, ps.target.trigger_mask
    assert pattern.shape == data.shape and pattern.dtype == np.float32 and 0 <= pattern.min() <= pattern.max() <= 1
    assert mask.shape == (*data.shape[:2], 1) and np.all(mask == np.float32(0.2))
    pos = data.positions(ps.poison_ids)
    expected = (1 - 0.2) * data.images[pos].astype(np.float64) + 0.2 * 255 * pattern.astype(np.float64)
    assert np.abs(ps.poisoned.astype(np.float64) - expected).max() <= 1
    out = ps.materialize()
    untouched = np.setdiff1d(np.arange(len(data)), pos)
    assert np.array_equal(out.images[untouched], data.images[untouched])
    assert ps.eps == pytest.approx(0.2)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 1.0])
def test_alpha_blend_changes_pixels_by_at_most_alpha(alpha):
    data, ps = craft(trigger="blend", alpha=alpha, budget=0.5)
    diff = np.abs(ps.poisoned.astype(int) - data.images[data.positions(ps.poison_ids)].astype(int))
    assert diff.max() <= round(alpha * 255) and ps.eps == pytest.approx(alpha)


def test_alpha_blend_random_pattern_follows_the_trigger_seed():
    def spec(seed):
        return BadNetsAttack(BadNetsConfig(trigger="blend", trigger_seed=seed)).trigger_spec((8, 8, 3))

    assert np.array_equal(spec(0).trigger, spec(0).trigger)
    assert not np.array_equal(spec(0).trigger, spec(1).trigger)


def _stripes(h, w):
    """(h, w, 3) uint8: red left half, blue right half."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2, 0] = 255
    image[:, w // 2:, 2] = 255
    return image


def test_alpha_blend_uses_a_png_resized_to_the_dataset(tmp_path):
    path = tmp_path / "kitty.png"
    Image.fromarray(_stripes(32, 32)).save(path)
    data, ps = craft(trigger="blend", alpha=0.2, budget=0.25, blend_image=str(path))
    pattern = ps.target.trigger
    assert pattern.shape == (8, 8, 3)
    assert np.allclose(pattern[:, :3], [1, 0, 0]) and np.allclose(pattern[:, -3:], [0, 0, 1])
    pos = data.positions(ps.poison_ids)
    expected = 0.8 * data.images[pos].astype(np.float64) + 0.2 * 255 * pattern.astype(np.float64)
    assert np.abs(ps.poisoned.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("as_float", [False, True])
def test_alpha_blend_uses_an_npy_converted_to_the_dataset_channels(tmp_path, as_float):
    image = _stripes(16, 16)
    path = tmp_path / "pattern.npy"
    np.save(path, image.astype(np.float32) / 255 if as_float else image)
    grey = BadNetsAttack(BadNetsConfig(trigger="blend", blend_image=str(path))).trigger_spec((8, 8, 1))
    assert grey.trigger.shape == (8, 8, 1)
    assert np.allclose(grey.trigger[:, :3], 0.299, atol=1e-3) and np.allclose(grey.trigger[:, -3:], 0.114, atol=1e-3)
    same = BadNetsAttack(BadNetsConfig(trigger="blend", blend_image=str(path))).trigger_spec((16, 16, 3))
    assert np.allclose(same.trigger, image / 255, atol=1e-6)


def test_missing_blend_image_is_a_user_error_before_crafting(tmp_path):
    missing = tmp_path / "nope.png"
    attack = BadNetsAttack(BadNetsConfig(trigger="blend", blend_image=str(missing)))
    with pytest.raises(UserInputError, match="attack.blend_image") as info:
        attack.validate(make_imageset(n=80, size=8, classes=4))
    assert str(missing) in str(info.value)


def test_unreadable_blend_image_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"not an image")
    with pytest.raises(UserInputError, match="attack.blend_image"):
        craft(trigger="blend", blend_image=str(path))


def test_alpha_must_lie_in_the_unit_interval():
    for alpha in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            BadNetsConfig(trigger="blend", alpha=alpha)


def test_trigger_magnification():
    x = torch.full((1, 1, 4, 4), 0.5)
    sign = BadNetsAttack(BadNetsConfig(trigger="sign", eps=0.05)).trigger_spec((4, 4, 1))
    assert torch.allclose((apply_trigger(x, sign, 3.0) - x).abs(), torch.full_like(x, 0.15))
    patch = BadNetsAttack(BadNetsConfig(patch_size=2, pattern="white")).trigger_spec((4, 4, 1))
    assert torch.equal(apply_trigger(x, patch, 1.0), apply_trigger(x, patch, 3.0))
    blend = BadNetsAttack(BadNetsConfig(trigger="blend", alpha=0.2)).trigger_spec((4, 4, 1))
    pattern = torch.from_numpy(blend.trigger).permute(2, 0, 1).unsqueeze(0)
    for m, weight in ((1.0, 0.2), (3.0, 0.6), (10.0, 1.0)):  # alpha * m, capped at 1
        assert torch.allclose(apply_trigger(x, blend, m), (1 - weight) * x + weight * pattern, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"target_class": 9}, "target_class"), ({"patch_size": 20}, "patch_size"),
     ({"label_mode": "clean", "budget": 0.9}, "budget")],
)
def test_data_dependent_errors(kw, needle):
    with pytest.raises(UserInputError, match=needle):
        craft(**kw)
