"""Narcissus pieces (issue 10): the surrogate's training set, the poison warm-up, trigger synthesis (direction,
bound, early stop), validation before compute, the differentiable Langevin chain, and the defense-aware
variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_imageset
from puregen_dist.attacks.narcissus import NarcissusAttack, NarcissusConfig, poison_warmup, synthesize_trigger
from puregen_dist.attacks.surrogate import load_surrogate, surrogate_meta, surrogate_training_set
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.transfer import save_classifier
from puregen_dist.config.errors import UserInputError
from puregen_dist.config.generative import LangevinConfig
from puregen_dist.generative.langevin import differentiable_langevin, langevin_chain

CPU = torch.device("cpu")


@pytest.fixture
def surrogate_dir(tmp_path):
    """A randomly initialised small CNN surrogate for 16x16x3 images: POOD classes 0..2, target classes 1 and 3."""
    torch.manual_seed(0)
    net = build_classifier("small_cnn", in_channels=3, num_classes=5, image_size=16)
    return save_classifier(tmp_path / "surrogate", net, name="small_cnn", in_channels=3, num_classes=5,
                           image_size=16, meta=surrogate_meta(3, [1, 3], (0.5,) * 3, (0.5,) * 3))


def _cfg(surrogate, **overrides) -> NarcissusConfig:
    fast = {"warmup_epochs": 1, "rounds": 3, "batch_size": 16, "device": "cpu", "target_class": 1,
            "budget": 0.1}
    return NarcissusConfig(surrogate=str(surrogate), **{**fast, **overrides})


# ------------------------------------------------------------------------------------------ surrogate


def test_surrogate_set_puts_pood_classes_first_then_the_target_classes():
    victim = make_imageset(n=40, size=8, classes=4, seed=1)
    pood = make_imageset(n=30, size=8, classes=3, seed=2)
    mixed = surrogate_training_set(victim, pood, [2, 0], pood_drop_classes=[1])
    assert mixed.classes == ("c0", "c2", "target:c2", "target:c0")
    assert np.bincount(mixed.labels).tolist() == [10, 10, 10, 10]  # 2 kept POOD classes, 2 target classes
    assert np.array_equal(mixed.images[mixed.labels == 2], victim.images[victim.labels == 2])
    assert np.array_equal(mixed.ids, np.arange(len(mixed)))


def test_surrogate_set_refuses_bad_classes_and_shapes():
    victim, pood = make_imageset(n=8, size=8, classes=4), make_imageset(n=8, size=8, classes=2)
    with pytest.raises(UserInputError, match="target_classes: 4"):
        surrogate_training_set(victim, pood, [4])
    with pytest.raises(UserInputError, match="pood_drop_classes: 2"):
        surrogate_training_set(victim, pood, [0], [2])
    with pytest.raises(UserInputError, match="pood.image_size"):
        surrogate_training_set(victim, make_imageset(n=8, size=16, classes=2), [0])


def test_surrogate_checkpoint_maps_target_classes_to_outputs(surrogate_dir):
    surrogate = load_surrogate(surrogate_dir)
    assert (surrogate.output_of(1), surrogate.output_of(3)) == (3, 4)
    with pytest.raises(UserInputError, match="attack.target_class: 0 is not among"):
        surrogate.output_of(0)


# ------------------------------------------------------------------------------------------ the algorithm


class Linear(nn.Module):
    """Logits W·mean-pooled-channels: the target logit grows along a known direction."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]]))

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.w.T


def test_trigger_moves_towards_the_target_within_eps_and_lowers_the_loss():
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    model = Linear()
    result = synthesize_trigger(model, images, 0, eps=8 / 255, rounds=40, lr=0.01, batch_size=10, crop_padding=0,
                                flip=False, grad_tolerance=0.0, generator=torch.Generator().manual_seed(0),
                                device=CPU)
    delta = result.trigger[0]
    assert delta.abs().max() <= 8 / 255 + 1e-7
    # target 0 wants channel 0 up, channel 1 down, channel 2 up: saturated at the bound
    assert torch.allclose(delta[0], torch.full_like(delta[0], 8 / 255), atol=1e-4)
    assert torch.allclose(delta[1], torch.full_like(delta[1], -8 / 255), atol=1e-4)
    assert result.losses[-1] < result.losses[0]
    assert all(p.requires_grad for p in model.parameters())  # frozen during synthesis only


def test_a_vanished_gradient_stops_synthesis_after_one_round():
    constant = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    nn.init.zeros_(constant[1].weight)
    result = synthesize_trigger(constant, torch.rand(6, 3, 8, 8), 1, eps=0.1, rounds=50, lr=0.01, batch_size=6,
                                crop_padding=0, flip=False, grad_tolerance=0.0, generator=torch.Generator(),
                                device=CPU)
    assert len(result.losses) == 1 and result.grad_sums == [0.0] and result.trigger.abs().max() == 0


def test_warmup_teaches_the_surrogate_the_target_output():
    model = Linear()
    images = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = poison_warmup(model, images, 1, epochs=5, lr=0.1, batch_size=8, crop_padding=0, flip=False,
                           generator=torch.Generator().manual_seed(0), device=CPU)
    assert len(losses) == 5 and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ the attack


def test_validation_names_the_problem_before_any_compute(surrogate_dir, tmp_path):
    data = make_imageset(n=40, size=16, classes=4)
    with pytest.raises(UserInputError, match="attack.surrogate: required"):
        NarcissusAttack(NarcissusConfig(target_class=1)).validate(data)
    with pytest.raises(UserInputError, match="attack.target_class: 0 is not among"):
        NarcissusAttack(_cfg(surrogate_dir, target_class=0)).validate(data)
    with pytest.raises(UserInputError, match="attack.num_poisons: asks for 11 poisons but class 1 has only 10"):
        NarcissusAttack(_cfg(surrogate_dir, num_poisons=11)).validate(data)
    with pytest.raises(UserInputError, match=r"attack.surrogate: .* was trained on \(16, 16, 3\)"):
        NarcissusAttack(_cfg(surrogate_dir)).validate(make_imageset(n=40, size=8, classes=4))
    with pytest.raises(UserInputError, match=r"missing/config.json: checkpoint config not found"):
        NarcissusAttack(_cfg(surrogate_dir, through_ebm=str(tmp_path / "missing"))).validate(data)


def test_craft_poisons_target_rows_within_eps_with_labels_unchanged(surrogate_dir):
    data = make_imageset(n=40, size=16, classes=4)
    poison = NarcissusAttack(_cfg(surrogate_dir, eps=8 / 255, num_poisons=4, selection="last")).craft(data, seed=0)
    assert np.array_equal(poison.poison_ids, data.ids[data.labels == 1][-4:])
    assert np.array_equal(poison.poison_labels, np.ones(4, np.int64))
    base = data.images[data.positions(poison.poison_ids)].astype(int)
    assert np.abs(poison.poisoned.astype(int) - base).max() <= 8
    assert poison.target.trigger.shape == (16, 16, 3) and np.abs(poison.target.trigger).max() <= 8 / 255 + 1e-7
    assert poison.meta["trigger_rounds"] == 3 and poison.meta["num_poisons"] == 4


# ------------------------------------------------------------------------------------------ defense-aware


def test_differentiable_langevin_matches_the_chain_and_its_closed_form_jacobian():
    a, step, temp = 0.3, 0.05, 0.01
    energy = lambda x: a * (x ** 2).flatten(1).sum(dim=1)  # noqa: E731  G = a‖x‖²: x ← x(1 − 2a·drift) + εz
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    steps = iter(noise)
    *_, last = langevin_chain(energy, x0, lambda x: next(steps), steps=4, step_size=step, temperature=temp)
    x = x0.clone().requires_grad_(True)
    out = differentiable_langevin(energy, x, iter(noise), step_size=step, temperature=temp)
    assert torch.allclose(out, last.x, atol=1e-6)
    out.sum().backward()
    factor = (1 - 2 * a * 0.5 * step * step / temp) ** 4
    assert torch.allclose(x.grad, torch.full_like(x0, factor), atol=1e-6)


def test_the_purification_it_looks_through_passes_gradients_back(surrogate_dir, tiny_checkpoints):
    ebm_dir, _ = tiny_checkpoints[3]
    attack = NarcissusAttack(_cfg(surrogate_dir, through_ebm=str(ebm_dir), through_langevin=LangevinConfig(steps=3)))
    purify = attack.purification(CPU, torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = purify(x)
    assert out.shape == x.shape and out.requires_grad
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not purify(x, False).requires_grad  # the warm-up's pass builds no graph
    assert NarcissusAttack(_cfg(surrogate_dir)).purification(CPU, torch.Generator()) is None


def test_defense_aware_narcissus_optimises_through_the_ebm(surrogate_dir, tiny_checkpoints):
    data = make_imageset(n=40, size=16, classes=4)
    ebm_dir, _ = tiny_checkpoints[3]
    aware = NarcissusAttack(_cfg(surrogate_dir, through_ebm=str(ebm_dir), through_langevin=LangevinConfig(steps=2)))
    calls = []
    original = aware.purification

    def counting(device, generator):
        purify = original(device, generator)
        return lambda x, *args: (calls.append(len(x)), purify(x, *args))[1]

    aware.purification = counting
    poison = aware.craft(data, seed=0)
    plain = NarcissusAttack(_cfg(surrogate_dir)).craft(data, seed=0)
    assert calls and sum(calls) >= 10 * (1 + 3)  # the warm-up images once, then every synthesis batch
    assert np.abs(poison.target.trigger).max() <= 16 / 255 + 1e-7
    assert not np.array_equal(poison.target.trigger, plain.target.trigger)
