"""Gradient Matching's crafting core (issue 11): the alignment loss, the augmentation, the step schedule, and a
brew whose gradient alignment rises while δ stays within the ε ball and the pixel range."""

from __future__ import annotations

import torch
from torch import nn

from puregen_dist.attacks.gradient_matching import (
    alignment_loss,
    brew_poisons,
    differentiable_augment,
    parameter_gradient,
    step_schedule,
)


def _colour_images(n: int, channel: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, 8, 8) images whose ``channel`` is bright: the toy task's class is the dominant channel."""
    x = torch.rand(n, 3, 8, 8, generator=generator) * 0.4
    x[:, channel] += 0.5
    return x


def _model() -> nn.Module:
    """A small CNN trained for a few steps to tell the dominant channel (so class gradients differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([_colour_images(32, c, gen) for c in range(3)])
    y = torch.arange(3).repeat_interleave(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def test_alignment_loss_is_one_minus_the_cosine():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    assert float(alignment_loss(a, a)) == 0.0
    assert abs(float(alignment_loss(a, [-a[0], a[1]])) - 2.0) < 1e-6
    assert abs(float(alignment_loss(a, [torch.tensor([0.0, 1.0]), torch.tensor([[0.0]])])) - 1.0) < 1e-6


def test_augmentation_is_differentiable_and_seeded():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = differentiable_augment(x, torch.Generator().manual_seed(0))
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None and x.grad.abs().sum() > 0
    again = differentiable_augment(x.detach(), torch.Generator().manual_seed(0))
    assert torch.equal(out.detach(), again)


def test_step_decays_at_three_five_and_seven_eighths():
    assert step_schedule(250) == [93, 156, 218] and step_schedule(8) == [3, 5, 7]


def test_brewing_raises_the_gradient_alignment_within_eps():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    poisons, targets = _colour_images(16, 2, gen), _colour_images(1, 0, gen)  # a class-0 target ...
    labels, adversarial = torch.full((16,), 2), torch.tensor([2])  # ... to be classified as the poisons' class 2
    before = float(alignment_loss(parameter_gradient(model, poisons, labels, create_graph=False),
                                  parameter_gradient(model, targets, adversarial, create_graph=False)))
    brew = brew_poisons(model, poisons, labels, targets, adversarial, eps=16 / 255, iterations=30, restarts=2,
                        batch_size=16, augment=False, generator=torch.Generator().manual_seed(0))
    after = float(alignment_loss(parameter_gradient(model, poisons + brew.delta, labels, create_graph=False),
                                 parameter_gradient(model, targets, adversarial, create_graph=False)))
    print(f"alignment loss 1 - cos: before {before:.3f}, after {after:.3f}")
    assert after < before - 0.05, (before, after)  # cosine similarity rose
    assert brew.losses[-1] < brew.losses[0] and len(brew.restart_losses) == 2
    assert brew.losses[-1] == min(brew.restart_losses)  # the best restart is kept
    assert brew.delta.abs().max() <= 16 / 255 + 1e-6
    assert (poisons + brew.delta).min() >= 0 and (poisons + brew.delta).max() <= 1
    assert all(p.grad is None for p in model.parameters())  # the surrogate is never updated


def test_a_poison_key_draws_a_test_target_a_different_class_and_poisons_of_that_class(tmp_path):
    import numpy as np
    import pytest

    from conftest import make_imageset
    from puregen_dist.attacks.gradient_matching import GradientMatchingAttack, GradientMatchingConfig
    from puregen_dist.classifiers import build_classifier
    from puregen_dist.classifiers.transfer import save_classifier
    from puregen_dist.config.errors import UserInputError

    train, test = make_imageset(n=80, size=8, classes=4), make_imageset(n=20, size=8, classes=4, seed=3)
    save_classifier(tmp_path / "clf", build_classifier("small_cnn", in_channels=3, num_classes=4, image_size=8),
                    name="small_cnn", in_channels=3, num_classes=4, image_size=8,
                    meta={"mean": [0.5] * 3, "std": [0.5] * 3})
    trials = []
    for key in range(6):
        attack = GradientMatchingAttack(GradientMatchingConfig(surrogate=str(tmp_path / "clf"), poison_key=key,
                                                               num_poisons=5))
        trial = attack.draw_trial(train, test)
        assert trial.adversarial_label != test.labels[trial.target_row]
        assert np.all(train.labels[trial.poison_rows] == trial.adversarial_label) and len(trial.poison_rows) == 5
        again = attack.draw_trial(train, test)  # reproducible
        assert (again.target_row, again.adversarial_label) == (trial.target_row, trial.adversarial_label)
        assert np.array_equal(again.poison_rows, trial.poison_rows)
        trials.append((trial.target_row, trial.adversarial_label))
    assert len(set(trials)) > 1  # keys draw different trials
    poison = GradientMatchingAttack(GradientMatchingConfig(surrogate=str(tmp_path / "clf"), num_poisons=5,
                                                           iterations=2, restarts=1, device="cpu")).craft(
        train, seed=0, test=test)
    assert poison.target.kind == "triggerless" and poison.target.target_ids[0] in test.ids
    with pytest.raises(UserInputError, match="needs the clean test split"):
        GradientMatchingAttack(GradientMatchingConfig(surrogate=str(tmp_path / "clf"))).craft(train, seed=0)
    with pytest.raises(UserInputError, match="asks for 21 poisons of one class but a class has only 20"):
        GradientMatchingAttack(GradientMatchingConfig(surrogate=str(tmp_path / "clf"), num_poisons=21)).validate(train)


def test_an_ensemble_averages_its_members_alignment():
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    poisons, targets = _colour_images(8, 2, gen), _colour_images(1, 0, gen)
    labels, adversarial = torch.full((8,), 2), torch.tensor([2])
    kwargs = {"eps": 16 / 255, "iterations": 10, "restarts": 1, "batch_size": 8, "augment": False}
    ensemble = brew_poisons([model, other], poisons, labels, targets, adversarial,
                            generator=torch.Generator().manual_seed(0), **kwargs)

    def loss_on(m, delta):
        return float(alignment_loss(parameter_gradient(m, poisons + delta, labels, create_graph=False),
                                    parameter_gradient(m, targets, adversarial, create_graph=False)))

    zero = torch.zeros_like(poisons)
    assert (loss_on(model, ensemble.delta) + loss_on(other, ensemble.delta)
            < loss_on(model, zero) + loss_on(other, zero))  # both members' alignment improved on average
    assert ensemble.delta.abs().max() <= 16 / 255 + 1e-6
