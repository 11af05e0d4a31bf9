"""FRIENDS: friendly noise within its clamp that keeps the model's predictions, random noise with the configured
statistics, the noise optimised on schedule with a learning-rate schedule that really steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_imageset
from puregen_dist.classifiers.evaluation import predict
from puregen_dist.config.errors import FieldError
from puregen_dist.data.transforms import to_unit
from puregen_dist.defenses import build_defense
from puregen_dist.defenses.friends import (
    FriendsConfig,
    FriendsGaussianConfig,
    FriendsHook,
    friendly_images,
    friendly_noise,
    frozen_copy,
    random_noise,
)

CLAMP = 16 / 255


@pytest.fixture(scope="module")
def digits_noise(digits_patch_poison, digits_detector):
    """Friendly noise (PureGen's defaults) for 512 digits images against the trained digits CNN."""
    data, _ = digits_patch_poison
    x = to_unit(data.images[:512])
    model = frozen_copy(digits_detector, "eval")
    noise = torch.cat([friendly_noise(model, chunk, FriendsConfig(), torch.Generator().manual_seed(0))
                       for chunk in x.split(128)])
    return model, x, noise


def test_friendly_noise_respects_its_clamp_and_uses_most_of_it(digits_noise):
    _, _, noise = digits_noise
    assert noise.abs().max() <= CLAMP + 1e-7
    assert noise.abs().mean() > 0.5 * CLAMP  # mu rewards magnitude: most pixels sit near the bound


def test_friendly_noise_keeps_the_frozen_models_predictions(digits_noise):
    """Stated bound: at most 8% of predictions change. Measured on 512 digits images: 6.4% (mean noise 15.3/255),
    against 12.7% for random signs of the same bound (with PureGen's train-mode copy: 24%)."""
    model, x, noise = digits_noise
    before = predict(model, x)
    changed = (before != predict(model, (x + noise).clamp(0, 1))).mean()
    assert changed <= 0.08
    signs = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1).sign() * CLAMP
    assert (before != predict(model, (x + signs).clamp(0, 1))).mean() > changed


def test_the_noise_learning_rate_schedule_really_steps(monkeypatch, digits_noise):
    """MultiStepLR at iterations 10 and 15 of 20 (x 0.1 each): PureGen's official code never stepped it."""
    seen = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    model, x, _ = digits_noise
    friendly_noise(model, x[:8], FriendsConfig(), torch.Generator().manual_seed(0))
    assert seen == [100.0] * 10 + [pytest.approx(10.0)] * 5 + [pytest.approx(1.0)] * 5


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_random_noise_statistics_match_their_parameters(kind):
    eps = 8 / 255
    noise = random_noise(torch.Size((64, 3, 32, 32)), kind, eps, torch.Generator().manual_seed(0))
    assert abs(float(noise.mean())) < 0.01 * eps * 10
    if kind == "bernoulli":
        assert noise.unique().tolist() == pytest.approx([-eps, eps])
        assert abs(float((noise > 0).float().mean()) - 0.5) < 0.01
    else:
        assert float(noise.std()) == pytest.approx(eps, rel=0.01)
        assert abs(float((noise.abs() < eps).float().mean()) - 0.6827) < 0.01  # one-sigma mass
    same = random_noise(torch.Size((4, 4)), kind, eps, torch.Generator().manual_seed(3))
    assert torch.equal(same, random_noise(torch.Size((4, 4)), kind, eps, torch.Generator().manual_seed(3)))


def hook_run(cfg, epochs, data, model):
    """Drive a FRIENDS hook like the training loop: (per-epoch sets, per-epoch batch outputs)."""
    hook = FriendsHook(cfg, seed=0)
    sets, batches = [], []
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        sets.append(hook.on_epoch_start(epoch, data, model))
        x = to_unit(sets[-1].images[:4])
        batches.append(hook.on_batch(x, torch.from_numpy(sets[-1].ids[:4]), generator) - x)
    return hook, sets, batches


def test_the_noise_is_optimised_on_schedule_and_applied_from_then_on(digits_patch_poison, digits_detector):
    data = digits_patch_poison[0].take(np.arange(64))
    cfg = FriendsConfig(begin_epoch=2, iterations=4)
    hook, sets, batches = hook_run(cfg, 5, data, digits_detector)
    assert hook.generated_at == [3]  # epoch index 2
    assert sets[0] is data and sets[1] is data and torch.equal(batches[0], torch.zeros_like(batches[0]))
    changed = np.abs(sets[2].images.astype(int) - data.images.astype(int))
    assert changed.max() <= 16 and changed.mean() > 2  # friendly noise, stored as 8 bit
    assert np.array_equal(sets[2].images, sets[4].images)  # optimised once (the original)
    assert np.array_equal(sets[2].ids, data.ids) and np.array_equal(sets[2].labels, data.labels)
    assert torch.allclose(batches[3].abs(), torch.full_like(batches[3], 8 / 255))  # fresh Bernoulli noise
    assert not torch.equal(batches[3], batches[4])
    refreshed, refreshed_sets, _ = hook_run(FriendsConfig(begin_epoch=1, iterations=2, refresh_every=2), 6, data,
                                            digits_detector)
    assert refreshed.generated_at == [2, 4, 6]
    assert not np.array_equal(refreshed_sets[1].images, refreshed_sets[3].images)


def test_the_noise_follows_ids_not_positions(digits_patch_poison, digits_detector):
    data = digits_patch_poison[0].take(np.arange(40))
    hook = FriendsHook(FriendsConfig(begin_epoch=0, iterations=2), seed=0)
    noisy = hook.on_epoch_start(1, data, digits_detector)
    subset = data.take(np.array([7, 3, 30]))  # e.g. what EPIC would keep, in another order
    again = hook.on_epoch_start(2, subset, digits_detector)
    assert np.array_equal(again.ids, subset.ids)
    assert np.array_equal(again.images, noisy.images[[7, 3, 30]])


def test_friendly_images_are_deterministic_at_a_seed(digits_detector):
    data = make_imageset(n=12, size=16, channels=1, classes=10)
    run = [friendly_images(digits_detector, data, FriendsConfig(iterations=3), torch.Generator().manual_seed(0))[0]
           for _ in range(2)]
    assert np.array_equal(run[0], run[1])


def test_friends_b_and_g_are_registered_with_their_noise():
    assert build_defense(FriendsConfig()).cfg.random_noise == "bernoulli"
    assert build_defense(FriendsGaussianConfig()).cfg.random_noise == "gaussian"


@pytest.mark.parametrize(("key", "value"), [("lr", float("inf")), ("clamp", 0.0), ("iterations", 0),
                                            ("begin_epoch", -1), ("mu", float("nan")), ("momentum", 1.0)])
def test_config_refuses_bad_values(key, value):
    with pytest.raises(FieldError, match=key):
        FriendsConfig(**{key: value})
